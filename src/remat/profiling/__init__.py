"""Profiling a model: its regions, their ops, costs and bytes, and the training step's
memory around them -> ``Profile`` (``remat.profile``, in ``profiler``). The profile's data
format is ``profile_data``; the chain it gives the solver is ``Profile.to_chain()``."""
