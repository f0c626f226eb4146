"""A region's saved bytes from its profiling record: each saved tensor counted once, in
the region whose backward needs it last, its input counted when something saves it.
"""

from __future__ import annotations

from collections.abc import Sequence

from remat.profiling.region_record import RegionRecord

__all__ = ["handed_on", "saved_union"]


def handed_on(recs: Sequence[RegionRecord]) -> list[set[int]]:
    """Per region, the storages it saves that a later region takes as input.

    A region that saves its own output (ReLU, sigmoid, exp save their result) saves the very
    tensor the next region takes as input. The chain model counts a saved input in the
    consumer's saved bytes, so each such tensor is counted once, there, and not in the
    producer's.
    """
    handed = []
    for i, rec in enumerate(recs):
        later = set().union(*(r.input.keys for r in recs[i + 1 :]))
        # An in-place region (ReLU(inplace=True)) hands on its own input, rewritten.
        passed_through = rec.input.keys & rec.output.keys
        handed.append((rec.saved.keys() & later) - (rec.input.keys - passed_through))
    return handed


def saved_union(rec: RegionRecord, handed: set[int], received: set[int]) -> tuple[int, bool, int]:
    """A region's saved bytes, its input counted when it is saved (by the region, or by the
    region before as its output: ``received``), whether all of it is, and how much of it
    is: a ReLU's input, the Linear's output before it, is freed once the ReLU has run, so
    the ReLU's saved bytes leave it out. What it ``handed`` on to a later region is
    counted there."""
    keys = rec.input.keys  # keys exclude pre-existing inputs
    saved_inputs = {k for k in keys if (k in rec.saved or k in received) and k not in handed}
    own = sum(v for k, v in rec.saved.items() if k not in keys and k not in handed)
    saved_input = sum(rec.input_sizes[k] for k in saved_inputs)
    return own + saved_input, saved_inputs == keys, saved_input
