"""A plan's budget in ``torch.compile``'s terms: the share of activations it keeps.

``torch._functorch.config.activation_memory_budget`` (torchtitan's ``memory_budget`` mode) is
not a bound on the peak: it is the fraction of the activations saved between the compiled
forward and backward, against the partitioner's choice without recomputation (1.0 keeps
them all, 0.0 recomputes everything it may). The same quantity for a remat plan is what its
regions hold from their forward to their backward over what they hold when every region is
stored, so that a torchtitan user can read a remat plan in the unit they know.
"""

from __future__ import annotations

from remat.solver.memory_model import plan_from_choices
from remat.solver.problem import Chain
from remat.solver.solution import Plan

__all__ = ["activation_share"]


def activation_share(chain: Chain, plan: Plan) -> float:
    """Bytes the plan keeps from the forward to the backward over the bytes kept with every
    region stored (0.0 to 1.0; above 1.0 never: a checkpoint keeps at most what storing does).

    A region inside a multi-region segment holds its bytes only while the segment reruns;
    from the forward to the backward the segment keeps its first region's input.

    Raises:
        ValueError: the plan is for another chain (its regions differ).
    """
    if [r.name for r in plan.regions] != [r.name for r in chain.regions]:
        raise ValueError(
            "activation_share: the plan's regions are not the chain's "
            f"({len(plan.regions)} against {len(chain.regions)} regions)"
        )
    stored = plan_from_choices(chain, ["store"] * len(chain.regions))
    everything = sum(r.kept_bytes for r in stored.regions)
    if everything == 0:
        return 1.0
    outermost = [(a, b) for a, b in plan.segments if not _inside(a, b, plan.segments)]
    kept = sum(r.kept_bytes for r in plan.regions if r.depth == 0)
    kept += sum(chain.regions[a].input_bytes for a, _ in outermost)
    return min(kept / everything, 1.0)


def _inside(a: int, b: int, segments: tuple[tuple[int, int], ...]) -> bool:
    return any(c <= a and b <= d and (c, d) != (a, b) for c, d in segments)
