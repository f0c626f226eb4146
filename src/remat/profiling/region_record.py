"""What the profiling step records about one region, written by its forward hooks and
the recorder (``op_recording``) and read by the profile's later steps (``saved_bytes``,
``shared_inputs``, ``run_alone``, ``profiler``). Storages are named by their key
(``untyped_storage()._cdata``) while they live; parameters, buffers and the model's
inputs are left out of every set here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["RegionRecord", "Storages"]


class Storages(NamedTuple):
    """Unique storages, by key, and their total bytes."""

    keys: set[int]
    nbytes: int


@dataclass(eq=False)
class RegionRecord:
    """One region over the recorded step (mutable: hooks fill it in as the step runs)."""

    # storage key -> bytes of what autograd saves while the region runs
    saved: dict[int, int] = field(default_factory=dict)
    # seconds of each call (the profiled one, then the timed forwards)
    times: list[float] = field(default_factory=list)
    # position in the forward; None until it runs
    order: int | None = None
    # (args, kwargs) of its first call, caches as they were, to replay it alone
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    input: Storages | None = None
    input_sizes: dict[int, int] = field(default_factory=dict)
    # the input storages a gradient reached in the backward
    inputs_with_gradient: set[int] = field(default_factory=set)
    # its input tensors and their versions while the call runs (emptied after it)
    input_versions: list[tuple[Tensor, int]] = field(default_factory=list)
    # the regions whose output tensors it takes as input
    takes_output_of: set[str] = field(default_factory=set)
    start: float = 0.0
    output: Storages | None = None
    output_refs: list[weakref.ref[Tensor]] = field(default_factory=list)
    # output storages that are inputs handed back unchanged (T5's position bias)
    passed_keys: set[int] = field(default_factory=set)
    # it writes one of its inputs in place (checkpointing it would raise)
    writes_input: bool = False
    # position among the output's tensor leaves -> bytes, for outputs that need a gradient
    output_sizes: dict[int, int] = field(default_factory=dict)
    # positions whose gradient arrived in the backward
    output_gradients: set[int] = field(default_factory=set)
    # positions an op outside the region took
    used_outside: set[int] = field(default_factory=set)
    # output storage key -> its positions
    output_positions: dict[int, set[int]] = field(default_factory=dict)
    # its output's gradient is held through its backward (see ``mark_gradient_held``)
    gradient_held: bool = False
    # ops a recomputation runs: up to its last save
    rerun_ops: int = 0

    @property
    def ran(self) -> bool:
        return self.input is not None
