"""The gradients live while each region runs backward: its own (in its measured
transients), the later regions', those of the parameters outside the chain, and what the
step measured beside each region's backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.profiling.profile_data import RegionProfile
from remat.profiling.step_memory import StepMemory

__all__ = ["GradientOrder", "with_gradient_bytes"]


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
    head_left: int | None = None,
    loss_bytes: int = 0,
    input_gradient_bytes: Sequence[int] = (),
    accumulated: set[int] | None = None,
    step: StepMemory | None = None,
) -> list[RegionProfile]:
    """Add to each region's transient the parameter gradients live during its backward.

    Gradients pile up as backward runs from the last region to the first: while region i
    runs backward, the gradients of regions i+1.. (its own are in its measured transient)
    and of the parameters outside the chain are live, except those that appear only after
    the chain's backward (``after_the_chain``). ``head_left``: what the step measured live
    beyond the chain when its backward starts (``StepMemory.at_chain_backward``), which
    also sees a tied weight's partial gradient held for its use before the chain; it
    replaces the outside parameters' gradients where it is larger. ``loss_bytes``: the
    loss and its gradient (``StepMemory.loss``), live through every region's backward.
    ``input_gradient_bytes``: per region, the gradients of inputs several regions share
    (an encoder's output, a learned position bias) accumulating beside its backward
    (``shared_inputs.shared_gradient_bytes``). ``accumulated``: the ids of the parameters
    the profiled backward gave a gradient (``None``: all that require grad); a tower the
    forward did not run gets none. ``step``: what the step measured beside each region's
    backward (``StepMemory.beside_region_backward``); where known it replaces the sum
    above, which can only guess when a gradient made outside the chain appears, or what
    the head leaves and frees. Beside it, what the step held at the chain's backward that
    it made before, and the chain model does not count, stays live, less what ops between
    the regions free by then (``StepMemory.left_between_regions``); and the region's
    backward covers those ops' backward before it (``StepMemory.before_region_backward``).
    """

    def grad_bytes(params: Any) -> int:
        return sum(
            p.numel() * p.element_size()
            for p in params
            if p.requires_grad and (accumulated is None or id(p) in accumulated)
        )

    own = [grad_bytes(module.parameters()) for _, module in chosen]
    inside = {id(p) for _, module in chosen for p in module.parameters()}
    outside = grad_bytes(
        p for p in model.parameters() if id(p) not in inside and id(p) not in after_the_chain
    )
    shared = list(input_gradient_bytes) or [0] * len(profiles)
    out, later = [], max(outside + loss_bytes, head_left or 0)
    for profile_, own_bytes, extra in zip(reversed(profiles), reversed(own), reversed(shared)):
        # its own gradients are in its measured transient already (transient_bytes)
        out.append(profile_.with_later_gradients(later + extra))
        later += own_bytes
    out.reverse()
    measured = () if step is None else step.beside_region_backward
    last = measured[-1] if len(measured) == len(profiles) and profiles else None
    if step is None or head_left is None or last is None:
        return out
    before = max(0, head_left - last)
    for i, beside in enumerate(measured):
        if beside is not None:
            gap = step.before_region_backward[i] or 0
            held = _still_held(before, step.left_between_regions, i) + beside
            out[i] = profiles[i].with_backward_at_least(gap).with_later_gradients(held)
    return out


def _still_held(before: int, left: Sequence[int | None], region: int) -> int:
    """Of ``before`` (what the step held at the chain's backward, made before it, that the
    chain model does not count), what is still held when ``region`` runs backward: less
    what ops between the regions freed since (``left``, per region). What of theirs the
    model counts elsewhere (``left`` beyond ``before``) is taken to be freed first."""
    if len(left) <= region or left[-1] is None or left[region] is None:
        return before
    freed = left[-1] - left[region]
    counted_elsewhere = max(0, left[-1] - before)
    return before - min(before, max(0, freed - counted_elsewhere))
