"""A region run alone, forward and backward: its transient bytes, and the fixed cost of
op-level checkpointing on it (measured against the region run plainly).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from remat.engine.caches import fresh_caches
from remat.errors import RematError
from remat.measure.tracker import MemoryTracker
from remat.policy.op_level import Ops
from remat.policy.treatments import Recompute, Treatment
from remat.profiling.op_recording import OpRecord
from remat.profiling.profile_data import op_engine
from remat.profiling.region_record import RegionRecord

__all__ = ["op_overheads", "recompute_transient_bytes", "transient_bytes"]


_WARM_UP_PAIRS = 3


# The tape's overhead is about 1 ms in a GPT block step of 65 ms that varies by 2-3 ms;
# with 6 pairs, two profiles read it as 0.7 and 1.3 ms.
_MEASURED_PAIRS = 15


def op_overheads(
    chosen: Sequence[tuple[str, nn.Module]],
    records: dict[str, RegionRecord],
    ops: dict[str, list[OpRecord]],
    sync: Callable[[], None],
    repeats: int,
    op_engines: str = "auto",
) -> dict[str, float | None]:
    """Per region, what op-level checkpointing adds to a training step beyond recomputing
    ops: the region run with every cacheable op's output saved on the engine its plans use
    (so little is recomputed; the replay engine dispatches the ops twice and replays the
    Python forward, the tape records every op) against the region run
    plainly, forward and backward, as the median difference of alternating runs after a few
    warm-up pairs (it is a few percent of the region's step: a difference of minima was too
    noisy, and a fresh process pays more in its first runs). Regions of one type running the
    same ops are measured once. ``None``: op-level checkpointing fails on the region."""

    measured: dict[tuple[Any, ...], float | None] = {}
    out = {}
    for name, module in chosen:
        region_ops = ops.get(name, ())
        key = (type(module), tuple(o.name for o in region_ops))
        writes_input = records[name].writes_input
        key = (*key, writes_input)
        if region_ops and key not in measured:
            treatment = Ops(
                save_calls=frozenset(o.name for o in region_ops if o.saveable),
                engine="tape" if writes_input else op_engine(region_ops, op_engines),
            )
            call = records[name].call
            differences = []
            try:
                with own_gradients(module):
                    for i in range(_WARM_UP_PAIRS + max(_MEASURED_PAIRS, 2 * repeats)):
                        plain = step_seconds(module, *call, None, sync)
                        op_level = step_seconds(module, *call, treatment, sync)
                        if i >= _WARM_UP_PAIRS:
                            differences.append(op_level - plain)
            except (RematError, RuntimeError):
                # Op-level checkpointing does not run on it (a cached tensor written in
                # place later, a recomputation that takes another path): no op-level plan.
                measured[key] = None
                out[name] = None
                continue
            measured[key] = max(0.0, statistics.median(differences))
        out[name] = measured.get(key, 0.0)
    return out


def step_seconds(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    treatment: Any,
    sync: Callable[[], None],
) -> float:
    """One forward and backward pass of ``module`` alone (under ``treatment`` if given);
    the parameters' gradients are dropped afterwards."""
    a, k = fresh_inputs(args, kwargs)
    sync()
    start = time.perf_counter()
    out = module(*a, **k) if treatment is None else treatment.run(module, a, k)
    outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    sync()
    seconds = time.perf_counter() - start
    for p in module.parameters():
        p.grad = None
    return seconds


def transient_bytes(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    gradient_held: bool = False,
    seeded: frozenset[int] | None = None,
) -> tuple[int, int]:
    """Run the region alone, forward and backward, and return what it allocates on top of
    its saved activations and output: (the forward's excess over what it keeps, the
    backward's excess over what is live when it starts). ``seeded``: the positions of the
    outputs that get a gradient (``excess_bytes``)."""
    args, kwargs = fresh_inputs(args, kwargs)
    # The region's own parameter gradients appear during its backward as in the real step
    # (the later regions' ones are added by with_gradient_bytes). The parameters must keep
    # requiring grad: without, a Linear saves no input and runs a smaller graph.
    with own_gradients(module):
        forward, backward, _ = excess_bytes(
            module, args, kwargs, gradient_held=gradient_held, seeded=seeded
        )
        return forward, backward


def recompute_transient_bytes(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    gradient_held: bool = False,
    seeded: frozenset[int] | None = None,
) -> tuple[int, int, int]:
    """Run the region alone under its own checkpoint (``apply_plan``'s ``Recompute``),
    forward and backward, and return what it allocates beyond its input (which the
    checkpoint holds) and its output (in the forward) or its output's gradient (in the
    backward), and what its forward leaves live beyond its output: (forward, backward,
    left). The backward's figure covers the recomputation, which runs while the output's
    gradient is live and may rebuild the output itself, and the backward proper that
    follows it. ``left`` is what something outside autograd's graph holds (a KV cache the
    model fills even in training, as XLM's): the checkpoint does not free it."""
    args, kwargs = fresh_inputs(args, kwargs)
    with own_gradients(module):
        return excess_bytes(
            module, args, kwargs, Recompute(), gradient_held=gradient_held, seeded=seeded
        )


@contextlib.contextmanager
def own_gradients(module: nn.Module) -> Iterator[list[Tensor]]:
    """Run the module's backward alone: its parameters' gradients start at ``None`` and
    are put back afterwards. Yields the trainable parameters."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    stashed = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        yield trainable
    finally:
        for p, g in zip(trainable, stashed):
            p.grad = g


def fresh_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A region's recorded inputs cut from the model's graph, to run the region alone: a
    KV cache comes as it was before the recorded call (each run appends to its own copy)."""

    def fresh(t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
            # Not a leaf, as in the model: a region may write its input in place (an
            # in-place ReLU), which a leaf that requires grad refuses.
            return t.detach().requires_grad_(True).clone()
        return t.detach() if isinstance(t, Tensor) else t

    leaves, spec = tree_flatten((args, kwargs))
    return tree_unflatten([fresh(x) for x in fresh_caches(leaves, "a profiled region")], spec)


class _SeedGradients(torch.autograd.Function):
    """A scalar whose backward hands each output a gradient of ones made inside the
    autograd engine: freed once the region's last op has used it, as the gradient coming
    from the rest of the model is in a real step. Gradients held by the caller would stay
    live through the whole backward and count a block ending in a Linear one output too
    many."""

    @staticmethod
    def forward(ctx: Any, *outs: Tensor) -> Tensor:
        ctx.specs = [(o.shape, o.dtype, o.device) for o in outs]
        return outs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.ones(shape, dtype=dt, device=dev) for shape, dt, dev in ctx.specs)


def excess_bytes(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    treatment: Treatment | None = None,
    gradient_held: bool = False,
    seeded: frozenset[int] | None = None,
) -> tuple[int, int, int]:
    """(forward excess, backward excess, left after the forward): the backward's counted
    beyond the output's gradient, which the memory model adds itself
    (``Region.backward_bytes``); ``left``: what is live after the forward beyond the
    output. The inputs were made before the tracker started: they are never counted.
    ``gradient_held``: something outside the region holds its output's gradient through
    its backward (``op_recording.mark_gradient_held``): the backward is measured with the
    gradient held by the caller throughout, not freed once the region's last op used it.
    ``seeded``: the positions, among the output's tensor leaves, of the outputs that get a
    gradient in the step (``None``: all that require one); an output the model drops gets
    none, and its gradient is neither made nor counted here."""
    with MemoryTracker(timeline=False) as tracker:
        out = module(*args, **kwargs) if treatment is None else treatment.run(module, args, kwargs)
        after_forward = tracker.current_bytes
        left = after_forward - tracker.live_bytes_of(tree_leaves(out))
        forward_excess = tracker.peak_bytes - after_forward  # before the gradients below
        outs = [
            t
            for i, t in enumerate(tree_leaves(out))
            if isinstance(t, Tensor) and t.requires_grad and (seeded is None or i in seeded)
        ]
        if outs and gradient_held:
            grads = [torch.ones_like(t) for t in outs]
            before_backward = tracker.current_bytes  # the gradients included
            torch.autograd.backward(outs, grads)
            backward_excess = tracker.peak_by_phase["backward"] - before_backward
        elif outs:
            grad_bytes = sum(t.numel() * t.element_size() for t in outs)
            seed = _SeedGradients.apply(*outs)
            start = torch.ones_like(seed)
            before_backward = tracker.current_bytes
            torch.autograd.backward(seed, start)
            backward_excess = tracker.peak_by_phase["backward"] - before_backward - grad_bytes
        else:
            backward_excess = 0
    return max(0, forward_excess), max(0, backward_excess), max(0, left)
