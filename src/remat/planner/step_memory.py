"""The training step's memory: its measured peak, what the chain does not see, and the
parameter gradients live while each region runs backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.measure.storage import iter_tensors, unique_storage_bytes
from remat.measure.tracker import MemoryTracker
from remat.planner.chain_dp import store_all_peak
from remat.planner.problem import Chain
from remat.planner.profile_data import RegionProfile

__all__ = [
    "GradientOrder",
    "handed_on",
    "measure_step",
    "measure_step_peak",
    "saved_union",
    "state_kept",
    "store_all_peak_of",
    "with_gradient_bytes",
]


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
    return measure_step(model, inputs, loss_fn, kwargs)[0]


def measure_step(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    kwargs: dict[str, Any],
    last: nn.Module | None = None,
) -> tuple[int, int]:
    """(the step's peak, the peak from the end of ``last``'s forward until its output's
    gradient is ready: what the rest of the model adds on top), new bytes."""
    model.zero_grad(set_to_none=True)
    window: dict[str, int] = {}
    with MemoryTracker(module=model, count_existing=[model, *inputs], timeline=False) as tracker:

        def after_last(module: nn.Module, args: Any, out: Any) -> None:
            if window:
                return  # the first call ends the chain's forward
            window["started"] = 1
            tracker.start_window()
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            if outs:

                def at_gradient(grad: Tensor) -> None:
                    window.setdefault("peak", tracker.window_peak_bytes)

                outs[0].register_hook(at_gradient)

        handle = last.register_forward_hook(after_last) if last is not None else None
        try:
            loss_fn(model(*inputs, **kwargs)).backward()
        finally:
            if handle is not None:
                handle.remove()
    existing = unique_storage_bytes(
        iter_tensors(list(model.parameters()), list(model.buffers()), inputs)
    )
    model.zero_grad(set_to_none=True)
    return tracker.peak_bytes - existing, max(0, window.get("peak", existing) - existing)


class GradientOrder:
    """In the profiling backward: when each parameter's gradient is accumulated, and how many
    were before the first region's input gradient was ready (the chain's backward done)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.chain_done: int | None = None

    def watch(self, model: nn.Module, first_call: Any) -> list[Any]:
        """Hooks to remove after the backward."""

        def accumulated(p: Tensor) -> None:
            self.seen.setdefault(id(p), len(self.seen))

        def chain_done(grad: Tensor) -> None:
            if self.chain_done is None:
                self.chain_done = len(self.seen)

        params = [p for p in model.parameters() if p.requires_grad]
        handles = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
        firsts = [t for t in tree_leaves(first_call) if isinstance(t, Tensor) and t.requires_grad]
        if firsts:
            handles.append(firsts[0].register_hook(chain_done))
        return handles

    def after_the_chain(self) -> set[int]:
        """Ids of the parameters whose gradients appear only after the chain's backward (an
        embedding before the chain): not live while any region runs backward."""
        if self.chain_done is None:
            return set()
        return {pid for pid, k in self.seen.items() if k >= self.chain_done}


def with_gradient_bytes(
    model: nn.Module,
    chosen: Sequence[tuple[str, nn.Module]],
    profiles: list[RegionProfile],
    after_the_chain: set[int] = frozenset(),
) -> list[RegionProfile]:
    """Add to each region's transient the parameter gradients live during its backward.

    Gradients pile up as backward runs from the last region to the first: while region i
    runs backward, the gradients of regions i+1.. (its own are in its measured transient)
    and of the parameters outside the chain are live, except those that appear only after
    the chain's backward (``after_the_chain``).
    """

    def grad_bytes(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params if p.requires_grad)

    own = [grad_bytes(module.parameters()) for _, module in chosen]
    inside = {id(p) for _, module in chosen for p in module.parameters()}
    outside = grad_bytes(
        p for p in model.parameters() if id(p) not in inside and id(p) not in after_the_chain
    )
    out, later = [], outside
    for profile_, own_bytes in zip(reversed(profiles), reversed(own)):
        # its own gradients are in its measured transient already (transient_bytes)
        out.append(replace(profile_, transient_bytes=profile_.transient_bytes + later))
        later += own_bytes
    return out[::-1]


def handed_on(recs: Sequence[dict[str, Any]]) -> list[set[int]]:
    """Per region, the storages it saves that a later region takes as input.

    A region that saves its own output (ReLU, sigmoid, exp save their result) saves the very
    tensor the next region takes as input. The chain model counts a saved input in the
    consumer's saved bytes, so each such tensor is counted once, there, and not in the
    producer's.
    """
    handed = []
    for i, rec in enumerate(recs):
        later = set().union(*(r["input"][0] for r in recs[i + 1 :]))
        # An in-place region (ReLU(inplace=True)) hands on its own input, rewritten.
        passed_through = rec["input"][0] & rec["output"][0]
        handed.append((rec["saved"].keys() & later) - (rec["input"][0] - passed_through))
    return handed


def saved_union(rec: dict[str, Any], handed: set[int], received: set[int]) -> tuple[int, bool]:
    """A region's saved bytes, its input counted when it is saved (by the region, or by the
    region before as its output: ``received``), and whether it is: a ReLU's input, the
    Linear's output before it, is freed once the ReLU has run, so the ReLU's saved bytes
    leave it out. What it ``handed`` on to a later region is counted there."""
    keys, _ = rec["input"]  # keys exclude pre-existing inputs
    saved_inputs = {k for k in keys if (k in rec["saved"] or k in received) and k not in handed}
    own = sum(v for k, v in rec["saved"].items() if k not in keys and k not in handed)
    # Part of a several-tensor input saved: counted, and the whole input held on top when a
    # checkpoint holds it (an overcount, on the safe side).
    return own + sum(rec["input_sizes"][k] for k in saved_inputs), saved_inputs == keys


def store_all_peak_of(profiles: Sequence[RegionProfile], tail: int) -> int:

    return store_all_peak(Chain([p.to_region() for p in profiles], tail_bytes=tail))
