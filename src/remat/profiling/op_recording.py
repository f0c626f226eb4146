"""What the profiling step records per region: its input and output bytes, what it saves,
its ops (dispatch mode) and their times, through forward pre/post hooks.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from remat.engine.caches import snapshot_caches
from remat.engine.tape import writes_to_arguments
from remat.policy.op_level import draws_random_numbers
from remat.profiling.region_record import RegionRecord, Storages
from remat.targets.devices import Target, bytes_moved, op_flops

__all__ = [
    "OpRecord",
    "OpRecorder",
    "post_hook",
    "pre_hook",
    "received_output_gradient",
    "region_flops",
    "watch_output_gradients",
]


def storage_bytes(tree: Any, exclude: set[int]) -> Storages:
    keys: dict[int, int] = {}
    for t in tree_leaves(tree):
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            if st._cdata not in exclude:
                keys[st._cdata] = st.nbytes()
    return Storages(set(keys), sum(keys.values()))


@dataclass(slots=True)
class OpRecord:
    """One op call as the recorder sees it (mutable: later ops and saves update it)."""

    name: str
    output_bytes: int
    seconds: float
    output_saved: bool = False  # the region's own autograd nodes save its output
    saveable: bool = True  # a selective checkpoint may cache its output (see OpRecorder)
    recomputable: bool = True  # its outputs follow from its arguments (see OpProfile)


class OpRecorder(TorchDispatchMode):
    """Lists the ops each region runs, with their new output bytes, duration, whether the
    region's own autograd nodes save their output (``mark_saved``), and whether a selective
    checkpoint may cache it: not for random ops (skipping one in the recomputation would
    shift the random numbers of the ops after it) nor for in-place ops and the outputs they
    modify (the cache would hand back a changed tensor)."""

    def __init__(
        self,
        current: Callable[[], str | None],
        timed: bool,
        sync: Callable[[], None],
        target: Target | None = None,
        records: dict[str, RegionRecord] | None = None,
    ):
        super().__init__()
        self.current, self.timed, self.sync, self.target = current, timed, sync, target
        self.records = records
        self.ops: dict[str, list[OpRecord]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        # storage key -> (region, op record) of the op whose output lives there now. A key
        # is a storage's address, reused once the storage is freed: only the live storage's
        # producer may be looked up, which is what a save sees.
        self.producer: dict[int, tuple[str, OpRecord]] = {}
        # the profiler's own ops (its saved-tensor hook's detach) are not the region's
        self.paused = False

    def mark_saved(self, key: int, region: str) -> None:
        """``region`` saves the live storage ``key`` for backward."""
        found = self.producer.get(key)
        if found is not None and found[0] == region:
            found[1].output_saved = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        region = self.current()
        start = time.perf_counter() if self.timed and region else 0.0
        out = func(*args, **(kwargs or {}))
        if self.records is not None and not self.paused:
            mark_used_outputs(self.records, region, (args, kwargs))
        # prim.device and the like: metadata queries a FakeTensor dispatches, not kernels
        if region is None and func in _GRADIENT_PASSING and self.records is not None:
            mark_gradient_held(self.records, args)
        if region is None or self.paused or getattr(func, "namespace", "") == "prim":
            return out
        if self.timed:
            self.sync()
        elapsed = time.perf_counter() - start
        if self.target is not None:  # predicted, not measured
            dtype = next(
                (t.dtype for t in tree_leaves((out, args)) if isinstance(t, Tensor)),
                torch.float32,
            )
            moved = bytes_moved(args, kwargs or {}, out)
            elapsed = self.target.op_seconds(op_flops(func, args, kwargs or {}, out), moved, dtype)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor)}  # fmt: skip
        keys, nbytes = storage_bytes(out, inputs)
        counts = self.counts.setdefault(region, {})
        k = counts.get(str(func), 0)
        counts[str(func)] = k + 1
        mutates = func._schema.is_mutable
        if mutates:  # whatever it may write to must not come from the cache either
            for key in inputs:
                if key in self.producer:
                    self.producer[key][1].saveable = False
        random = draws_random_numbers(func, args, kwargs or {})
        record = OpRecord(
            f"{func}#{k}",
            nbytes,
            elapsed,
            saveable=not (mutates or random),
            recomputable=not (random or writes_to_arguments(func)),
        )
        self.ops.setdefault(region, []).append(record)
        self.producer.update(dict.fromkeys(keys, (region, record)))
        return out


# Ops whose backward hands the output's gradient itself to an operand (no new tensor).
_GRADIENT_PASSING = frozenset(
    {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.sub.Tensor}
)


def mark_gradient_held(records: dict[str, RegionRecord], args: tuple) -> None:
    """An add outside the regions of a region's output and its input (``x + ffn(x)`` with
    the feed-forward as the region, as XLM's layers are split): its backward hands the
    same gradient to the region and to ``x``'s other path, which holds it until the
    region's input gradient is added to it, through the region's whole backward. Run
    alone, the region frees its output's gradient once its last op used it: its
    transients are then measured with that gradient held (``gradient_held``)."""
    keys = {t.untyped_storage()._cdata for t in args if isinstance(t, Tensor) and t.requires_grad}
    if len(keys) < 2:
        return
    for rec in records.values():
        if rec.output is not None and rec.output.keys & keys and rec.input.keys & keys:
            rec.gradient_held = True


def pre_hook(name, stack, records, exclude, sync):
    def hook(module, args, kwargs):
        sync()
        rec = records[name]
        if rec.call is None:  # bytes come from the first (profiled) call; later ones are timed
            rec.order = sum(r.order is not None for r in records.values())  # in the forward
            # replayed alone for the transient, with any KV cache as it was before the call
            leaves, spec = tree_flatten((args, kwargs))
            rec.call = tree_unflatten(snapshot_caches(leaves), spec)
            rec.input = storage_bytes((args, kwargs), exclude)
            rec.input_sizes = {
                t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
            }  # fmt: skip
            # which inputs a gradient reaches (a shared one no region uses gets none)
            received = rec.inputs_with_gradient
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and t.requires_grad:
                    key = t.untyped_storage()._cdata
                    t.register_hook(functools.partial(_received_gradient, received, key))
            rec.input_versions = [
                (t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
            ]
            # Which regions' outputs it takes, as tensor objects: a remat segment carries on
            # into a call only through the very tensors its calls returned.
            rec.takes_output_of = {
                other
                for other, r in records.items()
                for ref in r.output_refs
                if any(ref() is t for t, _ in rec.input_versions)
            }
        rec.start = time.perf_counter()
        stack.append(name)

    return hook


def post_hook(name, stack, records, exclude, sync):
    def hook(module, args, output):
        sync()
        rec = records[name]
        rec.times.append(time.perf_counter() - rec.start)
        if rec.output is None:
            rec.output = storage_bytes(output, exclude)
            rec.output_refs = [weakref.ref(t) for t in tree_leaves(output) if isinstance(t, Tensor)]
            # an input handed back unchanged (T5's blocks return the position bias they
            # take) is not the region's output: its gradient is the input's
            passed = {id(t) for t, v in rec.input_versions if t._version == v}
            rec.passed_keys = {
                t.untyped_storage()._cdata
                for t in tree_leaves(output)
                if isinstance(t, Tensor) and id(t) in passed
            }
            watch_output_gradients(rec, output, passed)
        versions, rec.input_versions = rec.input_versions, []
        if any(t._version != v for t, v in versions):  # checkpointing it would raise
            rec.writes_input = True
        if stack and stack[-1] == name:
            stack.pop()

    return hook


def watch_output_gradients(rec: RegionRecord, output: Any, passed: Collection[int] = ()) -> None:
    """Note in ``rec`` which of the region's outputs (positions among its tensor leaves)
    get a gradient from the rest of the step, and their sizes: an output the model drops
    (the attention probabilities a layer returns beside its hidden state) gets none, so
    its region's backward runs without that gradient. Two marks, both needed: an op
    outside the region takes the output (``mark_used_outputs``: a hook on the tensor also
    fires for the region's own uses of it), and a gradient reaches it in the backward.
    ``passed``: the ids of its inputs it hands back unchanged, which are not watched."""
    positions = rec.output_positions
    for i, t in enumerate(tree_leaves(output)):
        if isinstance(t, Tensor) and t.requires_grad and id(t) not in passed:
            rec.output_sizes[i] = t.numel() * t.element_size()
            t.register_hook(functools.partial(_received_gradient, rec.output_gradients, i))
            st = t.untyped_storage()
            if st._cdata not in positions:  # a storage freed may be reused by another tensor
                weakref.finalize(st, positions.pop, st._cdata, None)
            positions.setdefault(st._cdata, set()).add(i)


def _received_gradient(received: set[int], position_or_key: int, grad: Tensor) -> None:
    received.add(position_or_key)


def mark_used_outputs(records: dict[str, RegionRecord], region: str | None, args: Any) -> None:
    """The outputs of regions other than the running one (``region``) that an op takes."""
    keys = {t.untyped_storage()._cdata for t in tree_leaves(args) if isinstance(t, Tensor)}
    for name, rec in records.items():
        positions = rec.output_positions
        if name != region and positions:
            for key in keys & positions.keys():
                rec.used_outside |= positions[key]


def received_output_gradient(rec: RegionRecord) -> frozenset[int]:
    """The positions of the region's outputs that get a gradient from the rest of the step."""
    return frozenset(rec.output_gradients & rec.used_outside)


def region_flops(model, chosen, inputs, kwargs) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # With grad on: FlopCounterMode's module tracker hooks the gradients of each module's
    # inputs, and under no_grad a model may hand a module a tensor that requires grad but
    # has no grad_fn (mamba's conv weight views), which the hook cannot attach to.
    with counter:
        model(*inputs, **kwargs)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    return {name: sum(counts.get(f"{prefix}.{name}", {}).values()) for name, _ in chosen}
