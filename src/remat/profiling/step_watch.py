"""The hooks that follow one measured training step around the chain of regions
(``StepWatch``): the tracker's totals at the chain's landmarks and, per region, its inputs,
outputs and backward, turned into a ``StepMemory`` once the step is done (``step.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.measure.storage import unique_storage_bytes
from remat.measure.tracker import MemoryTracker, PeakWindow
from remat.profiling.step_memory import BackwardSpan, StepMemory

__all__ = ["StepWatch"]


class StepWatch:
    """The hooks that follow one measured step around the chain, and what they saw.

    ``seen`` holds the tracker's totals at the chain's landmarks (its start, the end of its
    forward, its backward's start); the per-region records follow each region's first call:
    its inputs (by position in ``tree_leaves((args, kwargs))``), its outputs, and the start
    and end of its backward.
    """

    def __init__(self, tracker: MemoryTracker, held: Sequence[Tensor]) -> None:
        self.tracker = tracker
        self.existing = unique_storage_bytes(held)
        self.existing_keys = {t.untyped_storage()._cdata for t in held}
        self.seen: dict[str, int] = {}
        self.live: dict[str, frozenset[tuple[int, int]]] = {}
        self.handles: list[Any] = []
        # each region's tensor inputs on its first call, by position, to tell when each is freed
        self.region_inputs: dict[tuple[int, int], weakref.ref] = {}
        self.made_before: set[tuple[int, int]] = set()
        self.made_after_region: dict[tuple[int, int], int] = {}
        self.region_starts: dict[int, int] = {}  # allocations when its forward started
        self.region_ends: list[int] = []  # allocations when each region's forward ended
        # storages, not keys: a key is reused once its storage is freed
        self.output_refs: dict[int, list[weakref.ref]] = {}
        self.output_sizes: dict[int, list[int]] = {}
        self.taken_later: set[tuple[int, int]] = set()  # (region, output) a later one takes
        self.gradient_reached: set[tuple[int, int]] = set()
        self.backward_start: dict[int, tuple[int, list[int]]] = {}
        self.left_between: dict[int, int] = {}  # what ops between regions still hold
        self.gap_from: set[int] = set()  # the regions whose backward has ended
        self.gap_peak: dict[int, int] = {}
        # the regions' inputs by storage key while they live, and the positions of each
        # (a token per storage: a key is reused once its storage is freed)
        self.input_tokens: dict[int, int] = {}
        self.input_positions: dict[int, set[tuple[int, int]]] = {}
        self.finalizers: list[weakref.finalize] = []
        # the region whose backward is followed now (``backward_spans``), its window, and
        # per region its spans so far: [inputs freed just before, peak or None]
        self.span_region: int | None = None
        self.span_window: PeakWindow | None = None
        self.spans: dict[int, list[list[Any]]] = {}
        self.spans_whole: set[int] = set()

    # ------------------------------------------------------------------ hooks on and off
    def attach(
        self, first: nn.Module | None, last: nn.Module | None, regions: Sequence[nn.Module]
    ) -> None:
        if first is not None:
            self.handles.append(
                first.register_forward_pre_hook(self._before_first, with_kwargs=True)
            )
        if last is not None:
            self.handles.append(last.register_forward_hook(self._after_last))
        for index, region in enumerate(regions):
            self.handles.append(
                region.register_forward_pre_hook(self._follow_inputs(index), with_kwargs=True)
            )
            self.handles.append(region.register_forward_hook(self._end_of(index), with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for finalizer in self.finalizers:
            finalizer.detach()
        if self.span_window is not None:
            self.tracker.close_window(self.span_window)
            self.span_window = None

    # ------------------------------------------------------------------ the chain's ends
    def _before_first(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        seen, tracker = self.seen, self.tracker
        if "at_chain_start" in seen:
            return  # the first call starts the chain
        seen["before_chain_peak"] = tracker.peak_bytes
        seen["at_chain_start"] = tracker.current_bytes
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        seen["first_input"] = unique_storage_bytes(tensors) - unique_storage_bytes(
            t for t in tensors if t.untyped_storage()._cdata in self.existing_keys
        )
        needs_grad = [t for t in tensors if t.requires_grad]
        if needs_grad:

            def chain_done(grad: Tensor) -> None:
                if "after_chain" not in seen:
                    seen["after_chain"] = 1
                    tracker.start_window()

            needs_grad[0].register_hook(chain_done)

    def _after_last(self, module: nn.Module, args: Any, out: Any) -> None:
        seen = self.seen
        if "tail" in seen:
            return  # the first call ends the chain's forward
        seen["tail"] = 1
        seen["tail_allocations"] = self.tracker.allocations
        self.tracker.start_window()
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        if outs:
            outs[0].register_hook(self._at_chain_backward)

    def _at_chain_backward(self, grad: Tensor) -> None:
        seen, tracker = self.seen, self.tracker
        if "tail_peak" in seen:
            return
        seen["tail_peak"] = tracker.window_peak_bytes
        seen["at_chain_backward"] = tracker.current_bytes
        seen["output_gradient"] = unique_storage_bytes([grad])
        self.live["at_chain_backward"] = self.inputs_live()
        inputs = _live_keys([list(self.region_inputs.values())]) - self.existing_keys
        seen["before_chain_at_chain_backward"] = tracker.live_bytes_made_by(
            seen.get("allocations", 0), exclude=inputs
        )

    # ------------------------------------------------------------------ each region
    def _follow_inputs(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if index == 0 and "allocations" not in self.seen:
                self.seen["allocations"] = self.tracker.allocations
            if index in self.region_starts or "allocations" not in self.seen:
                return  # its first call in the chain only
            self._record_inputs(index, tree_leaves((args, kwargs)))

        return hook

    def _record_inputs(self, index: int, leaves: list[Any]) -> None:
        tracker = self.tracker
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        taking = {t.untyped_storage()._cdata for t in tensors}
        self.taken_later.update(
            (j, o)
            for j, refs in self.output_refs.items()
            for o, ref in enumerate(refs)
            if _key(ref) in taking
        )
        self.region_starts[index] = tracker.allocations
        takes = [t for t in tensors if t.requires_grad]
        if takes:
            self.handles.append(
                torch.autograd.graph.register_multi_grad_hook(
                    takes, self._backward_ended(index), mode="any"
                )
            )
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor):
                self.region_inputs[(index, i)] = weakref.ref(t.untyped_storage())
                self._watch_free(t.untyped_storage(), (index, i))
                if not tracker.made_after(t, self.seen["allocations"]):
                    self.made_before.add((index, i))
                self.made_after_region[(index, i)] = _last_region_ended(
                    tracker, t, self.region_ends
                )

    def _watch_free(self, storage: Any, at: tuple[int, int]) -> None:
        key = storage._cdata
        token = self.input_tokens.get(key)
        if token is None:
            token = self.input_tokens[key] = len(self.input_positions)
            self.input_positions[token] = set()
            self.finalizers.append(weakref.finalize(storage, self._input_freed, key, token))
        self.input_positions[token].add(at)

    def _input_freed(self, key: int, token: int) -> None:
        if self.input_tokens.get(key) == token:
            del self.input_tokens[key]
        freed = self.input_positions[token]
        if self.span_window is None or self.span_region is None:
            return
        spans = self.spans[self.span_region]
        peak = self.span_window.take()
        if peak is None:  # no op since the last cut: freed together with what it freed
            spans[-1][0] = spans[-1][0] | freed
        else:
            spans[-1][1] = peak
            spans.append([frozenset(freed), None])

    def _follow_backward(self, index: int, whole: bool) -> None:
        """End the span window of the region followed now (``whole``: its input's gradient
        is ready, the ops before it run backward from here), and follow region ``index``."""
        region, window = self.span_region, self.span_window
        if window is not None and region is not None:
            spans = self.spans[region]
            peak = self.tracker.close_window(window)
            if peak is not None:
                spans[-1][1] = peak
            elif len(spans) > 1:  # freed after its last op: it changed no peak
                spans.pop()
            if whole:
                self.spans_whole.add(region)
        self.span_region, self.span_window = None, None
        if index >= 0 and index not in self.spans:
            self.span_region, self.span_window = index, self.tracker.open_window()
            self.spans[index] = [[frozenset(), None]]

    def _backward_ended(self, index: int) -> Callable[[Tensor], None]:
        # the ops between it and the region before run backward from here
        def hook(grad: Tensor) -> None:
            if index not in self.gap_from:
                self.gap_from.add(index)
                self.tracker.start_window()
                if self.span_region == index:
                    self._follow_backward(index - 1, whole=True)

        return hook

    def _end_of(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            if "allocations" not in self.seen or len(self.region_ends) != index:
                return
            self.region_ends.append(self.tracker.allocations)
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            # what it hands back unchanged (T5's position bias) gets its gradient from the
            # regions before it, later
            taken = {id(t) for t in tree_leaves((args, kwargs))}
            outs = [t for t in outs if id(t) not in taken] or outs[:1]
            if outs:
                self._watch_backward_start(index, outs)

        return hook

    def _watch_backward_start(self, index: int, outs: list[Tensor]) -> None:
        # refs and sizes only: holding the outputs would keep them alive
        self.output_refs[index] = [weakref.ref(t.untyped_storage()) for t in outs]
        self.output_sizes[index] = [t.numel() * t.element_size() for t in outs]
        self.handles.extend(
            t.register_hook(self._backward_starts(index, k)) for k, t in enumerate(outs)
        )

    def _backward_starts(self, index: int, output: int) -> Callable[[Tensor], None]:
        # What the head, the loss and the backward so far made and still hold when the
        # region's backward starts (the first of its outputs' gradients is ready), that
        # gradient aside, and which of its other outputs' gradients were part-built then.
        def hook(grad: Tensor) -> None:
            self.gradient_reached.add((index, output))
            if "tail_allocations" not in self.seen or index in self.backward_start:
                return
            tracker = self.tracker
            made = tracker.live_bytes_made_after(self.seen["tail_allocations"])
            pending = [
                o
                for o in range(len(self.output_refs[index]))
                if o != output and (index, o) in self.taken_later
            ]
            self.backward_start[index] = (max(0, made - unique_storage_bytes([grad])), pending)
            if self.span_region != index:  # the last region's, or the end of the next not seen
                self._follow_backward(index, whole=False)
            if index + 1 in self.gap_from:  # the peak since the region after it ended
                self.gap_peak[index] = tracker.window_peak_bytes - tracker.current_bytes
            inputs = _live_keys([list(self.region_inputs.values())])
            # a region's output only ops outside the regions take (and hold)
            handed_out = _live_keys(self.output_refs.values()) - inputs
            self.left_between[index] = tracker.live_bytes_born(
                self._made_between_regions(), inputs, handed_out
            )

        return hook

    def _made_between_regions(self) -> Callable[[int], bool]:
        """Whether a storage born then was made in the chain's forward by an op outside
        every region (a norm, a projection between two stacks of regions)."""
        start, end = self.seen["allocations"], self.seen["tail_allocations"]
        ends = self.region_ends
        inside = [(a, ends[i]) for i, a in self.region_starts.items() if i < len(ends)]
        return lambda born: start < born <= end and not any(a < born <= e for a, e in inside)

    # ------------------------------------------------------------------ the result
    def inputs_live(self) -> frozenset[tuple[int, int]]:
        return frozenset(at for at, ref in self.region_inputs.items() if ref() is not None)

    def _beside_region_backward(self, index: int) -> int | None:
        # An output a later region took and a gradient reached had its gradient part-built
        # by that region's backward: counted in the region's own.
        if index not in self.backward_start:
            return None
        made, pending = self.backward_start[index]
        part_built = sum(
            self.output_sizes[index][k] for k in pending if (index, k) in self.gradient_reached
        )
        return max(0, made - part_built)

    def _backward_spans(self, index: int) -> tuple[BackwardSpan, ...] | None:
        if index not in self.spans_whole:
            return None
        return tuple(
            BackwardSpan(freed, max(0, peak - self.existing))
            for freed, peak in self.spans[index]
            if peak is not None
        )

    def memory(self, regions: int, after: int) -> StepMemory:
        seen, existing = self.seen, self.existing

        def new(key: str) -> int:
            return max(0, seen.get(key, existing) - existing)

        def new_or_none(key: str) -> int | None:
            return new(key) if key in seen else None

        return StepMemory(
            peak=self.tracker.peak_bytes - existing,
            tail_peak=new("tail_peak"),
            before_chain_peak=new("before_chain_peak"),
            at_chain_start=new("at_chain_start"),
            first_input=seen.get("first_input", 0),
            after_chain_peak=max(0, after - existing),
            at_chain_backward=new_or_none("at_chain_backward"),
            output_gradient=seen.get("output_gradient", 0),
            loss=seen.get("loss", 0),
            inputs_live_at_chain_backward=self.live.get("at_chain_backward", frozenset()),
            inputs_made_before_chain=frozenset(self.made_before),
            inputs_live_after_backward=self.live.get("after_backward", frozenset()),
            inputs_made_after_region=self.made_after_region,
            beside_region_backward=tuple(self._beside_region_backward(i) for i in range(regions)),
            left_between_regions=tuple(self.left_between.get(i) for i in range(regions)),
            before_region_backward=tuple(self.gap_peak.get(i) for i in range(regions)),
            backward_spans=tuple(self._backward_spans(i) for i in range(regions)),
            before_chain_at_chain_backward=new_or_none("before_chain_at_chain_backward"),
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
