"""``torch.compile``: a model with remat's plan, compiled, and its step's peak measured.

Under ``torch.compile`` every remat region runs as ``torch.utils.checkpoint``'s higher-order
op (see ``remat.policy.treatments.traceable_checkpoint``): a recomputed region, a segment, or
an op-level region whose kept ops become ``MUST_SAVE`` and the rest ``PREFER_RECOMPUTE``
through a selective-checkpoint ``context_fn``. The min-cut partitioner then keeps what the
plan keeps and recomputes the rest inside the compiled backward. Buffers are functionalized:
a BatchNorm's statistics are updated once, in the compiled forward, and the recomputation
reads the values the forward read.

Dynamo refuses a forward's Python side effect inside a checkpoint (it would not be replayed
when the backward recomputes) and runs the region eagerly instead, breaking the graph.
transformers' hub kernels set and reset a context variable in each attention forward, so
every layer of a transformers model breaks. :func:`compile` sets
``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`` (the setting
torchtitan and accelerate set for the same reason): side effects run once, in the forward.

Peaks inside compiled code are invisible to :class:`~remat.MemoryTracker` (dynamo runs
eagerly under a dispatch mode); :func:`compiled_step_peak` reads them from the allocators'
events with :class:`~remat.measure.allocations.AllocationTracker`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from remat.measure.allocations import allocated_step_peak

__all__ = ["compile", "compiled_step_peak"]


def compile(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, **options)``, ready for remat's regions: a region's forward
    side effects (transformers' kernel context variables) run once, in the forward, instead
    of breaking the graph (a process-wide dynamo setting, as torchtitan and accelerate set).

    Args:
        model: the model, with a plan applied (``remat.apply_plan``) or a policy
            (``remat.apply``, ``remat.integrations.hf.enable``).
        **options: ``torch.compile``'s keyword arguments (``backend``, ``mode``, ...).

    Returns:
        The compiled module (``torch.compile``'s ``OptimizedModule``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> remat.apply_plan(model, plan)
        >>> compiled = remat.compile(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.compile: model must be an nn.Module, got {type(model)!r}")
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return torch.compile(model, **options)


def compiled_step_peak(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    kwargs: dict[str, Any] | None = None,
    *,
    warmup: int = 2,
    **options: Any,
) -> int:
    """New bytes at the peak of one compiled training step of ``model`` (as it is now: with
    its plan applied), measured from the allocators' events.

    Dynamo's caches are cleared first (``torch._dynamo.reset()``): a model whose plan
    changed would otherwise run a graph compiled for the earlier plan. The model is compiled
    with :func:`compile`, run ``warmup`` steps (compilation allocates too), then measured.

    Args:
        model: the (uncompiled) model.
        inputs, kwargs: its inputs.
        loss_fn: model output -> scalar loss.
        warmup: steps run before the measured one.
        **options: ``torch.compile``'s keyword arguments.

    Returns:
        The peak in bytes (parameters and inputs aside; the gradients count).
    """
    torch._dynamo.reset()
    compiled = compile(model, **options)
    for _ in range(warmup):
        compiled.zero_grad(set_to_none=True)
        loss_fn(compiled(*inputs, **(kwargs or {}))).backward()
    return allocated_step_peak(compiled, inputs, loss_fn, kwargs)
