"""From a profile to a plan: ``remat.plan(profile, budget)`` and ``remat.pareto(profile)``.

The profile becomes the planner's chain problem; the budget, taken off what the chain does
not model (``outside_bytes``), goes to the solver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from remat.errors import BudgetError
from remat.profiling.profile_data import Profile
from remat.solver import Chain, min_peak_bytes, parse_budget, plan_chain
from remat.solver import pareto as chain_pareto
from remat.solver import plan_from_choices as chain_plan_from_choices
from remat.solver.budget import describe_bytes, percent_meant
from remat.solver.solution import Plan

__all__ = ["budget_hint", "pareto", "plan", "plan_from_choices", "short_repr", "split_budget"]


def split_budget(profile: Profile, budget: Any) -> tuple[int, int]:
    total = parse_budget(budget, baseline_bytes=profile.step_peak_bytes)
    return total, total - profile.outside_bytes


def _problem(profile: Any, who: str) -> Profile | Chain:
    if not isinstance(profile, (Profile, Chain)):
        raise TypeError(
            f"{who}: profile must be a remat.Profile (from remat.profile(model, ...)) or a "
            f"remat.solver.Chain, got {type(profile).__name__} {short_repr(profile)}"
        )
    return profile


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def budget_hint(budget: Any) -> str:
    meant = percent_meant(budget)
    return f" (did you mean {meant}?)" if meant is not None else ""


def plan(
    profile: Profile | Chain,
    budget: int | float | str,
    *,
    solver: str = "auto",
    op_options: bool = True,
    **options: Any,
) -> Plan:
    """The cheapest plan whose predicted training-step peak fits ``budget``.

    Args:
        profile: from :func:`remat.profile` (or a ``remat.solver.Chain``, planned as is).
        budget: bytes, a size (``"6GiB"``, ``"300MB"``) or a percentage of the
            un-checkpointed step's peak (``"40%"``; new bytes, parameters excluded).
        solver: ``"auto"``/``"chain"`` (optimal DP), ``"sqrt"``, ``"every-n"``, ``"greedy"``.
        op_options: give the chain solver each region's op-level menu.
        **options: solver options (``resolution_bytes``, ``nested``, ``n``).

    Returns:
        A ``remat.solver.Plan``; ``predicted_peak_bytes`` is the whole step's
            (``Profile.step_peak_for``: what lives outside the chain included).

    Raises:
        TypeError: ``profile`` is neither a Profile nor a Chain, or ``budget`` has a wrong type.
        ValueError: ``budget`` does not parse.
        BudgetError: nothing fits; ``min_feasible_bytes`` is the smallest budget that does.
            Its message gives the sizes in MB and as a share of the step's peak.
    """
    profile = _problem(profile, "remat.plan")
    if isinstance(profile, Chain):  # a hand-made or loaded problem: plan it as it is
        return plan_chain(profile, budget, solver=solver, **options)
    chain = profile.to_chain(op_options=op_options and solver in ("auto", "chain"))
    total, chain_budget = split_budget(profile, budget)
    baseline = profile.step_peak_bytes
    floor = profile.step_peak_for(min_peak_bytes(chain))
    if chain_budget <= 0 or total < profile.unplannable_bytes:
        below = (
            f"what lives outside the checkpointable regions "
            f"({describe_bytes(profile.outside_bytes, baseline)})"
            if chain_budget <= 0
            else "the step's peak before the regions' forward or after their backward "
            f"({describe_bytes(profile.unplannable_bytes, baseline)})"
        )
        raise BudgetError(
            f"remat.plan: budget {describe_bytes(total, baseline)}{budget_hint(budget)} is "
            f"below {below}; the smallest feasible budget is {describe_bytes(floor, baseline)}",
            min_feasible_bytes=floor,
        )
    try:
        result = plan_chain(chain, chain_budget, solver=solver, **options)
    except BudgetError as err:
        needed = profile.step_peak_for(err.min_feasible_bytes or 0)
        raise BudgetError(
            f"remat.plan: no {solver} plan fits {describe_bytes(total, baseline)}"
            f"{budget_hint(budget)}; the smallest feasible budget is "
            f"{describe_bytes(needed, baseline)}",
            min_feasible_bytes=needed,
        ) from None
    return dataclasses.replace(_with_outside(profile, result), budget_bytes=total)


def _with_outside(profile: Profile, result: Plan) -> Plan:
    """A chain's plan as a plan of the whole step (``Profile.step_peak_for``). A plan that
    checkpoints nothing is the step the profile measured: its peak is that step's (no
    checkpoint holds the inputs the regions share, which the model keeps beside the chain)."""
    checkpoints = result.segments or any(r.action != "store" for r in result.regions)
    peak = profile.step_peak_for(result.predicted_peak_bytes)
    return dataclasses.replace(
        result,
        predicted_peak_bytes=peak if checkpoints else min(peak, profile.step_peak_bytes),
        meta={
            **result.meta,
            "outside_bytes": profile.outside_bytes,
            "cost_unit": profile.cost_unit,
            "forward_flops": sum(r.flops for r in profile.regions),
            **({"target": profile.meta["target"]} if "target" in profile.meta else {}),
            "default_regions": profile.meta.get("default_regions", False),
            "regions_not_run": profile.meta.get("regions_not_run", []),
        },
    )


def pareto(profile: Profile | Chain, **options: Any) -> list[Plan]:
    """The frontier of (predicted peak, extra cost) plans for a profile (or a chain).

    Raises:
        TypeError: ``profile`` is neither a Profile nor a Chain.
    """
    profile = _problem(profile, "remat.pareto")
    if isinstance(profile, Chain):
        return chain_pareto(profile, **options)
    frontier = [_with_outside(profile, p) for p in chain_pareto(profile.to_chain(), **options)]
    # Plans whose chain peaks under the peaks outside it are predicted alike: keep the cheapest.
    return [
        p
        for k, p in enumerate(frontier)
        if not any(
            q.predicted_peak_bytes <= p.predicted_peak_bytes and q.extra_cost < p.extra_cost
            for q in frontier[:k] + frontier[k + 1 :]
        )
    ]


def plan_from_choices(
    profile: Profile | Chain,
    choices: Sequence[int | str],
    segments: Sequence[tuple[int, int]] = (),
    *,
    every_preset: bool = False,
) -> Plan:
    """A hand-made plan and its predicted training-step peak, as :func:`plan` predicts.

    Args:
        profile: from :func:`remat.profile` (or a ``remat.solver.Chain``).
        choices: per region, in chain order, an option name (``"store"``, ``"recompute"``,
            ``"offload"`` or an op-level option's name) or an index into its menu.
        segments: ``(start, stop)`` runs of regions checkpointed as one unit.
        every_preset: every region's menu holds the named op presets
            (``"save-matmuls"``), even where the planner's menu leaves one out as no
            better than another option: to predict a preset on every region.

    Returns:
        A ``remat.solver.Plan``; for a Profile its ``predicted_peak_bytes`` counts what the
        chain does not see, as :func:`plan`'s does, so the two are compared like for like.

    Raises:
        TypeError: ``profile`` is neither a Profile nor a Chain.
        ValueError: a choice or segment does not fit the chain.

    Example:
        >>> prof = remat.profile(model, x)
        >>> last_only = remat.plan_from_choices(prof, ["store"] * 3 + ["recompute"])
    """
    profile = _problem(profile, "remat.plan_from_choices")
    if isinstance(profile, Chain):
        return chain_plan_from_choices(profile, choices, segments)
    chain = profile.to_chain(every_preset=every_preset)
    result = chain_plan_from_choices(chain, choices, segments)
    return _with_outside(profile, result)
