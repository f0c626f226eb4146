"""One un-checkpointed training step, measured: its peak, and the memory around the
chain of regions (before it, at its backward, beside each region's backward, after it).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.measure.storage import iter_tensors, unique_storage_bytes
from remat.measure.tracker import MemoryTracker

__all__ = ["StepMemory", "measure_step", "measure_step_peak", "state_kept"]


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Put the model's buffers, its parameters' gradients and the RNG state back on exit.
    Gradients start at ``None`` meanwhile: a step's new bytes include its gradients."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    tensors = (*model.parameters(), *model.buffers())
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g


def measure_step_peak(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    **kwargs: Any,
) -> int:
    """New bytes at the peak of one training step (parameters and inputs excluded).

    Gradients are cleared first: they are allocated by the step, so they count.
    """
    return measure_step(model, inputs, loss_fn, kwargs).peak


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMemory:
    """One un-checkpointed training step's memory around the chain, new bytes only.

    Attributes:
        peak: the step's peak.
        tail_peak: the peak from the end of the last region's forward until its output's
            gradient is ready (the head and the loss, forward and backward).
        before_chain_peak: the peak before the first region's forward starts.
        at_chain_start: what is live when the first region's forward starts, its input
            included (``first_input``).
        first_input: the first region's tensor inputs, new storages only.
        at_chain_backward: what is live when the last region's output gradient is ready,
            that gradient included (``output_gradient``): besides what the chain and the
            parts before it hold, what the head's backward leaves (its parameters'
            gradients, a tied weight's gradient waiting for its other use); ``None``: not
            seen.
        after_chain_peak: the peak once the first region's input gradient is ready (what
            runs before the chain, backward; every parameter gradient is live).
        loss: the loss and the gradient ``backward()`` starts from (as large), live until
            the backward returns.
        inputs_live_at_chain_backward: which regions' tensor inputs, as (region, position
            in ``tree_leaves((args, kwargs))``) on its first call, are still held when the
            last region's output gradient is ready: the inputs regions share may be freed
            by then, or held by the model.
        inputs_made_before_chain: the same pairs for the inputs made before the first
            region's forward started (live then, so in ``at_chain_start``).
        inputs_live_after_backward: the same pairs for the inputs still held once the
            backward returned: something besides autograd's graph holds them.
        inputs_made_after_region: for the same pairs, the last region whose forward had
            ended when the input was made (``-1``: none had).
        before_chain_at_chain_backward: what of ``at_chain_start`` is still live when the
            last region's output gradient is ready, the regions' inputs aside (``None``:
            not seen): what ran before the chain may free some of what it made (a value
            the forward drops once the chain has started).
        beside_region_backward: per region, what the head, the loss and the backward so
            far had made and still held when its output's gradient was ready, that
            gradient aside (``None``: not seen): the gradients of the parameters and shared
            inputs that ran backward before it, and what the head leaves. Checkpointing
            changes none of it.
        left_between_regions: per region, at the same moment, what ops between the
            regions still held: what they made in the chain's forward and the regions'
            outputs only they take, the regions' inputs aside. A projection between two
            stacks of regions frees its saved input once it has run backward.
        before_region_backward: per region, how far the step rose above what it held
            then between the end of the next region's backward and the start of its own:
            those ops' backward (``None``: not seen; the last region's is the tail's).
    """

    peak: int
    tail_peak: int = 0
    before_chain_peak: int = 0
    at_chain_start: int = 0
    first_input: int = 0
    after_chain_peak: int = 0
    at_chain_backward: int | None = None
    output_gradient: int = 0
    loss: int = 0
    inputs_live_at_chain_backward: frozenset[tuple[int, int]] = frozenset()
    inputs_made_before_chain: frozenset[tuple[int, int]] = frozenset()
    inputs_live_after_backward: frozenset[tuple[int, int]] = frozenset()
    inputs_made_after_region: dict[tuple[int, int], int] = field(default_factory=dict)
    before_chain_at_chain_backward: int | None = None
    beside_region_backward: tuple[int | None, ...] = ()
    left_between_regions: tuple[int | None, ...] = ()
    before_region_backward: tuple[int | None, ...] = ()


def measure_step(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    kwargs: dict[str, Any],
    first: nn.Module | None = None,
    last: nn.Module | None = None,
    regions: Sequence[nn.Module] = (),
) -> StepMemory:
    """One training step under :class:`MemoryTracker`, and its memory before, around and
    after the chain from ``first`` to ``last`` (both ``None``: the peak alone); ``regions``:
    the chain's regions in order, whose inputs are followed (``inputs_live_at_chain_backward``)."""
    model.zero_grad(set_to_none=True)
    held = list(iter_tensors(list(model.parameters()), list(model.buffers()), inputs, kwargs))
    existing = unique_storage_bytes(held)
    existing_keys = {t.untyped_storage()._cdata for t in held}
    seen: dict[str, int] = {}
    live: dict[str, frozenset[tuple[int, int]]] = {}
    # each region's tensor inputs on its first call, by position, to tell when each is freed
    region_inputs: dict[tuple[int, int], weakref.ref] = {}
    made_before: set[tuple[int, int]] = set()
    made_after_region: dict[tuple[int, int], int] = {}
    region_ends: list[int] = []  # allocations when each region's forward ended
    backward_start: dict[int, tuple[int, list[int]]] = {}
    output_sizes: dict[int, list[int]] = {}
    input_refs: dict[int, list[weakref.ref]] = {}  # storages, not keys: a key is reused
    gradient_reached: set[tuple[int, int]] = set()
    region_starts: dict[int, int] = {}
    left_between: dict[int, int] = {}  # per region: what ops between regions still hold
    gap_from: set[int] = set()  # the regions whose backward has ended
    gap_peak: dict[int, int] = {}
    output_refs: dict[int, list[weakref.ref]] = {}
    taken_later: set[tuple[int, int]] = set()  # (region, output) a later region takes

    def made_between_regions(born: int) -> bool:
        # made in the chain's forward by an op outside every region (a norm, a projection
        # between two stacks of regions)
        if not seen["allocations"] < born <= seen["tail_allocations"]:
            return False
        ends = dict(enumerate(region_ends))
        return not any(a < born <= ends.get(i, a) for i, a in region_starts.items())

    def inputs_live() -> frozenset[tuple[int, int]]:
        return frozenset(at for at, storage in region_inputs.items() if storage() is not None)

    with MemoryTracker(module=model, count_existing=held, timeline=False) as tracker:

        def follow_inputs(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs_: Any) -> None:
                if index == 0 and "allocations" not in seen:
                    seen["allocations"] = tracker.allocations
                if any(at[0] == index for at in region_inputs) or "allocations" not in seen:
                    return  # its first call in the chain only
                tensors = [t for t in tree_leaves((args, kwargs_)) if isinstance(t, Tensor)]
                input_refs[index] = [weakref.ref(t.untyped_storage()) for t in tensors]
                taking = {t.untyped_storage()._cdata for t in tensors}
                taken_later.update(
                    (j, o)
                    for j, refs in output_refs.items()
                    for o, ref in enumerate(refs)
                    if _key(ref) in taking
                )
                region_starts[index] = tracker.allocations
                takes = [t for t in tensors if t.requires_grad]
                if takes:
                    handles.append(
                        torch.autograd.graph.register_multi_grad_hook(
                            takes, backward_ended(index), mode="any"
                        )
                    )
                for i, t in enumerate(tree_leaves((args, kwargs_))):
                    if isinstance(t, Tensor):
                        region_inputs[(index, i)] = weakref.ref(t.untyped_storage())
                        if not tracker.made_after(t, seen["allocations"]):
                            made_before.add((index, i))
                        made_after_region[(index, i)] = _last_region_ended(tracker, t, region_ends)

            return hook

        def backward_ended(index: int) -> Callable[[Tensor], None]:
            # the ops between it and the region before run backward from here
            def hook(grad: Tensor) -> None:
                if index not in gap_from:
                    gap_from.add(index)
                    tracker.start_window()

            return hook

        def end_of(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, kwargs_: Any, out: Any) -> None:
                if "allocations" in seen and len(region_ends) == index:
                    region_ends.append(tracker.allocations)
                    outs = [
                        t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad
                    ]
                    # what it hands back unchanged (T5's position bias) gets its gradient
                    # from the regions before it, later
                    taken = {id(t) for t in tree_leaves((args, kwargs_))}
                    outs = [t for t in outs if id(t) not in taken] or outs[:1]
                    if outs:
                        watch_backward_start(index, outs)

            return hook

        def watch_backward_start(index: int, outs: list[Tensor]) -> None:
            # What the head, the loss and the backward so far made and still hold when the
            # region's backward starts (the first of its outputs' gradients is ready), that
            # gradient aside, and which of its other outputs' gradients were part-built then.
            # keys and sizes only: holding the outputs would keep them alive
            refs = [weakref.ref(t.untyped_storage()) for t in outs]
            output_refs[index] = refs
            output_sizes[index] = [t.numel() * t.element_size() for t in outs]

            def ready(k: int) -> Callable[[Tensor], None]:
                def hook(grad: Tensor) -> None:
                    gradient_reached.add((index, k))
                    if "tail_allocations" not in seen or index in backward_start:
                        return
                    made = tracker.live_bytes_made_after(seen["tail_allocations"])
                    pending = [o for o in range(len(refs)) if o != k and (index, o) in taken_later]
                    backward_start[index] = (max(0, made - unique_storage_bytes([grad])), pending)
                    if index + 1 in gap_from:  # the peak since the region after it ended
                        gap_peak[index] = tracker.window_peak_bytes - tracker.current_bytes
                    inputs = _live_keys(input_refs.values())
                    # a region's output only ops outside the regions take (and hold)
                    handed_out = _live_keys(output_refs.values()) - inputs
                    left_between[index] = tracker.live_bytes_born(
                        made_between_regions, inputs, handed_out
                    )

                return hook

            handles.extend(t.register_hook(ready(k)) for k, t in enumerate(outs))

        def beside_region_backward(index: int) -> int | None:
            # An output a later region took and a gradient reached had its gradient
            # part-built by that region's backward: counted in the region's own.
            if index not in backward_start:
                return None
            made, pending = backward_start[index]
            part_built = sum(
                output_sizes[index][k] for k in pending if (index, k) in gradient_reached
            )
            return max(0, made - part_built)

        def before_first(module: nn.Module, args: Any, kwargs_: Any) -> None:
            if "at_chain_start" in seen:
                return  # the first call starts the chain
            seen["before_chain_peak"] = tracker.peak_bytes
            seen["at_chain_start"] = tracker.current_bytes
            leaves = tree_leaves((args, kwargs_))
            tensors = [t for t in leaves if isinstance(t, Tensor)]
            seen["first_input"] = unique_storage_bytes(tensors) - unique_storage_bytes(
                t for t in tensors if t.untyped_storage()._cdata in existing_keys
            )
            needs_grad = [t for t in tensors if t.requires_grad]
            if needs_grad:

                def chain_done(grad: Tensor) -> None:
                    if "after_chain" not in seen:
                        seen["after_chain"] = 1
                        tracker.start_window()

                needs_grad[0].register_hook(chain_done)

        def after_last(module: nn.Module, args: Any, out: Any) -> None:
            if "tail" in seen:
                return  # the first call ends the chain's forward
            seen["tail"] = 1
            seen["tail_allocations"] = tracker.allocations
            tracker.start_window()
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            if outs:

                def at_gradient(grad: Tensor) -> None:
                    if "tail_peak" not in seen:
                        seen["tail_peak"] = tracker.window_peak_bytes
                        seen["at_chain_backward"] = tracker.current_bytes
                        seen["output_gradient"] = unique_storage_bytes([grad])
                        live["at_chain_backward"] = inputs_live()
                        inputs = {
                            st._cdata for st in (ref() for ref in region_inputs.values()) if st
                        } - existing_keys
                        seen["before_chain_at_chain_backward"] = tracker.live_bytes_made_by(
                            seen.get("allocations", 0), exclude=inputs
                        )

                outs[0].register_hook(at_gradient)

        handles = []
        if first is not None:
            handles.append(first.register_forward_pre_hook(before_first, with_kwargs=True))
        if last is not None:
            handles.append(last.register_forward_hook(after_last))
        for index, region in enumerate(regions):
            handles.append(region.register_forward_pre_hook(follow_inputs(index), with_kwargs=True))
            handles.append(region.register_forward_hook(end_of(index), with_kwargs=True))
        try:
            loss = loss_fn(model(*inputs, **kwargs))
            # the loss, and the gradient backward() starts from: live until it returns
            if loss.untyped_storage()._cdata not in existing_keys:
                seen["loss"] = 2 * unique_storage_bytes([loss])
            loss.backward()
            del loss
            live["after_backward"] = inputs_live()
        finally:
            for handle in handles:
                handle.remove()
        after = tracker.window_peak_bytes if "after_chain" in seen else existing
    model.zero_grad(set_to_none=True)

    def new(key: str) -> int:
        return max(0, seen.get(key, existing) - existing)

    return StepMemory(
        peak=tracker.peak_bytes - existing,
        tail_peak=new("tail_peak"),
        before_chain_peak=new("before_chain_peak"),
        at_chain_start=new("at_chain_start"),
        first_input=seen.get("first_input", 0),
        after_chain_peak=max(0, after - existing),
        at_chain_backward=new("at_chain_backward") if "at_chain_backward" in seen else None,
        output_gradient=seen.get("output_gradient", 0),
        loss=seen.get("loss", 0),
        inputs_live_at_chain_backward=live.get("at_chain_backward", frozenset()),
        inputs_made_before_chain=frozenset(made_before),
        inputs_live_after_backward=live.get("after_backward", frozenset()),
        inputs_made_after_region=made_after_region,
        beside_region_backward=tuple(beside_region_backward(i) for i in range(len(regions))),
        left_between_regions=tuple(left_between.get(i) for i in range(len(regions))),
        before_region_backward=tuple(gap_peak.get(i) for i in range(len(regions))),
        before_chain_at_chain_backward=(
            new("before_chain_at_chain_backward")
            if "before_chain_at_chain_backward" in seen
            else None
        ),
    )


def _key(ref: weakref.ref) -> int | None:
    """The key of a storage still alive (``None``: freed)."""
    storage = ref()
    return None if storage is None else storage._cdata


def _live_keys(groups: Iterable[Sequence[weakref.ref]]) -> set[int]:
    """The keys of the storages still alive among ``groups`` of weak references."""
    return {key for refs in groups for ref in refs if (key := _key(ref)) is not None}


def _last_region_ended(tracker: MemoryTracker, t: Tensor, ends: Sequence[int]) -> int:
    """The last region whose forward had ended (``ends``: the tracker's allocations then)
    when ``t``'s storage was made; ``-1``: none."""
    return max((r for r, end in enumerate(ends) if tracker.made_after(t, end)), default=-1)
