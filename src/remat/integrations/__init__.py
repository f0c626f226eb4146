"""Integrations with other libraries: ``hf`` (transformers), ``distributed`` (DDP / FSDP2).

Each submodule imports its library lazily, so ``import remat`` stays light; import the
submodule you need, e.g. ``import remat.integrations.hf``.
"""
