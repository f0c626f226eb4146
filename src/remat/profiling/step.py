"""One un-checkpointed training step, measured: its peak, and the memory around the
chain of regions (before it, at its backward, beside each region's backward, after it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from remat.measure.storage import iter_tensors, unique_storage_bytes
from remat.measure.tracker import MemoryTracker
from remat.profiling.step_memory import BackwardSpan, StepMemory
from remat.profiling.step_watch import StepWatch

__all__ = ["BackwardSpan", "StepMemory", "measure_step", "measure_step_peak", "state_kept"]


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
    with MemoryTracker(module=model, count_existing=held, timeline=False) as tracker:
        watch = StepWatch(tracker, held)
        watch.attach(first, last, regions)
        try:
            loss = loss_fn(model(*inputs, **kwargs))
            # the loss, and the gradient backward() starts from: live until it returns
            if loss.untyped_storage()._cdata not in watch.existing_keys:
                watch.seen["loss"] = 2 * unique_storage_bytes([loss])
            loss.backward()
            del loss
            watch.live["after_backward"] = watch.inputs_live()
        finally:
            watch.detach()
        after = tracker.window_peak_bytes if "after_chain" in watch.seen else watch.existing
    model.zero_grad(set_to_none=True)
    return watch.memory(len(regions), after)
