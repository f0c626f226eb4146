"""A profile's first step: one training step in which every candidate region records, in
bytes, its input, its output and what autograd saves while it runs (unique storages;
parameters, buffers and the model's inputs excluded), while a dispatch mode lists every op
of each region; then the timed forward passes and the op-level overheads.

The records are the profile's working format, one :class:`RegionRecord` per region,
written by ``op_recording``'s hooks and read by the profile's later steps.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.errors import PlanError
from remat.measure.versions import Versioned
from remat.profiling.gradients import GradientOrder
from remat.profiling.op_recording import OpRecord, OpRecorder, post_hook, pre_hook, region_flops
from remat.profiling.region_record import RegionRecord
from remat.profiling.run_alone import op_overheads
from remat.targets.devices import Target

__all__ = ["Recording", "record_regions"]

Records = dict[str, RegionRecord]


@dataclass
class Recording:
    """What the recorded step saw: the regions that ran, in forward order (``chosen``),
    their records, their ops, the storages ops outside the regions saved, the default
    regions the forward did not run, the order the backward gave the parameters their
    gradients in, and each region's FLOPs and op-level overhead."""

    chosen: list[tuple[str, nn.Module]]
    records: Records
    ops: dict[str, list[OpRecord]]
    saved_outside: set[int]
    not_run: list[str]
    grad_order: GradientOrder
    flops: dict[str, int]
    overheads: dict[str, float | None]


def record_regions(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_of: Callable[[Any], Tensor],
    chosen: list[tuple[str, nn.Module]],
    *,
    default: bool,
    repeats: int,
    op_engines: str,
    target: Target | None,
    timed: bool,
) -> Recording:
    """Record ``chosen`` over one training step, then time ``repeats`` forwards (when
    ``timed``); ``default``: the regions are the default ones (those not run are left out)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Parameters, buffers and the model's inputs exist before the step: not new bytes, so a
    # region whose input is the data batch keeps nothing new when checkpointed.
    existing = (*model.parameters(), *model.buffers(), *tree_leaves((inputs, kwargs)))
    exclude = {t.untyped_storage()._cdata for t in existing if isinstance(t, Tensor)}
    stack: list[str] = []
    records: Records = {name: RegionRecord() for name, _ in chosen}
    handles = []
    for name, module in chosen:
        before = pre_hook(name, stack, records, exclude, sync)
        after = post_hook(name, stack, records, exclude, sync)
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, always_call=True))
    recorder = OpRecorder(lambda: stack[-1] if stack else None, timed, sync, target, records)
    saves = _SavedTensors(stack, records, exclude, recorder)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saves.pack, _unpack), recorder:
            loss = loss_of(model(*inputs, **kwargs))
        saves.forward_running = False
        not_run: list[str] = []
        if default:
            chosen, not_run = _default_regions_that_ran(model, chosen, records)
        _check_called_once(chosen, records)
        # The chain runs in forward order, whatever order the module lists give (XLM keeps
        # its attentions, norms and feed-forwards in four lists, called interleaved).
        chosen.sort(key=lambda item: _forward_position(records[item[0]], len(chosen)))
        grad_order = GradientOrder()
        handles += grad_order.watch(model, records[chosen[0][0]].call)
        loss.backward()
        model.zero_grad(set_to_none=True)
        for rec in records.values():
            rec.times.clear()
        for _ in range(repeats if timed else 0):
            with torch.no_grad():
                model(*inputs, **kwargs)
        flops = region_flops(model, chosen, inputs, kwargs)
        overheads = (
            op_overheads(chosen, records, recorder.ops, sync, repeats, op_engines)
            if timed
            else {}  # on meta or predicted: the engines' Python time is not modelled
        )
    finally:
        for h in handles:
            h.remove()
        saves.forget()
    for name, _ in chosen:
        if not records[name].ran:
            raise PlanError(f"remat.profile: region {name!r} did not run in the forward pass")
    return Recording(
        chosen=chosen,
        records=records,
        ops=recorder.ops,
        saved_outside=saves.saved_outside,
        not_run=not_run,
        grad_order=grad_order,
        flops=flops,
        overheads=overheads,
    )


class _SavedTensors:
    """The saved-tensor hooks of the recorded step: what each region saves, what ops
    outside the regions save, and where a recomputation of a region may stop."""

    def __init__(
        self, stack: list[str], records: Records, exclude: set[int], recorder: OpRecorder
    ) -> None:
        self.stack, self.records, self.exclude, self.recorder = stack, records, exclude, recorder
        self.forward_running = True
        self.saved_outside: set[int] = set()
        self._finalizers: list[weakref.finalize] = []

    def _unsaved(self, name: str, key: int) -> None:
        # Saved by a branch of the graph that nothing uses (a value computed and dropped,
        # as Mamba's mixer computes A twice): that node dies with the branch, in the
        # forward, and its saved tensors with it; they are never live at the backward.
        if self.forward_running:
            self.records[name].saved.pop(key, None)

    def pack(self, t: Tensor) -> Versioned:
        stack, records, recorder = self.stack, self.records, self.recorder
        st = t.untyped_storage()
        if stack:  # a recomputation stops at the region's last save, parameters included
            records[stack[-1]].rerun_ops = len(recorder.ops.get(stack[-1], ()))
        if not stack and st._cdata not in self.exclude:
            self.saved_outside.add(st._cdata)  # by an op outside the regions
        if stack and st._cdata not in self.exclude:
            if st._cdata not in records[stack[-1]].saved:
                self._finalizers.append(weakref.finalize(st, self._unsaved, stack[-1], st._cdata))
            records[stack[-1]].saved[st._cdata] = st.nbytes()
            recorder.mark_saved(st._cdata, stack[-1])
        # Detached: an output its own node saves (exp's result) held as itself would keep
        # that node alive through a cycle, so a branch the forward drops (Mamba's mixer
        # computes A twice) would stay live here and nowhere else.
        recorder.paused = True
        try:
            return Versioned(t)
        finally:
            recorder.paused = False

    def forget(self) -> None:
        for f in self._finalizers:
            f.detach()


def _unpack(packed: Versioned) -> Tensor:
    return packed.unpack("the profiled model")


def _default_regions_that_ran(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], records: Records
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The default regions the forward ran, and the names of those it did not: a
    composite's vision or audio tower on text input, a cross-attention layer without an
    image. Those hold nothing in this step; a plan leaves them as they are."""
    ran = [(name, module) for name, module in chosen if records[name].ran]
    if not ran:
        raise PlanError(
            f"remat.profile: none of the {len(chosen)} default regions of "
            f"{type(model).__name__} ({chosen[0][0]}, ...) ran in the forward pass; pass "
            "regions= naming the modules it runs"
        )
    return ran, [name for name, _ in chosen if not records[name].ran]


def _check_called_once(chosen: Sequence[tuple[str, nn.Module]], records: Records) -> None:
    """The chain model runs each region once per step; a region the forward calls again (a
    layer looped over, a block shared by several places) is outside it: say so."""
    again = {name: len(records[name].times) for name, _ in chosen}
    again = {name: calls for name, calls in again.items() if calls > 1}
    if again:
        name, calls = next(iter(again.items()))
        raise PlanError(
            f"remat.profile: region {name!r} runs {calls} times in one forward pass"
            f"{f' ({len(again)} such regions)' if len(again) > 1 else ''}; the planner "
            "plans a chain of regions that each run once (a layer looped over, or shared by "
            "several places, saves again on every call): pass regions= naming modules the "
            "forward calls once each, or checkpoint it by hand with remat.apply"
        )


def _forward_position(rec: RegionRecord, not_run: int) -> int:
    return not_run if rec.order is None else rec.order
