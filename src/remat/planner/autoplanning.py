"""From a profile to a plan, and from a plan to a checkpointed model.

``remat.plan(profile, budget)`` turns a :class:`remat.profile.Profile` into the planner's
chain problem, takes off the budget what the chain does not model (``outside_bytes``), and
solves it. ``remat.apply_plan(model, plan)`` applies it with ``remat.apply``: regions the plan
recomputes get :class:`~remat.policies.Recompute`, op-level choices get
:class:`~remat.policies.Ops` with the chosen calls, and multi-region segments become
:mod:`remat.segments` heads and followers (nested segments nest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.errors import BudgetError, PlanError
from remat.measure.training_call import (
    cache_off,
    check_loss_fn,
    default_loss,
    require_train_mode,
    training_call,
)
from remat.planner import Chain, min_peak_bytes, parse_budget, plan_chain
from remat.planner import pareto as chain_pareto
from remat.planner.budget import describe_bytes, looks_like_percent
from remat.planner.problem import Plan
from remat.planner.profile_data import Profile
from remat.planner.profiling import profile as make_profile
from remat.planner.regions import default_regions
from remat.planner.step_memory import measure_step_peak, state_kept
from remat.policy.segment import segment_roles
from remat.policy.treatments import Ops, Recompute, Treatment
from remat.policy.wrapping import apply, remove

__all__ = ["AutoPlan", "apply_plan", "autoplan", "measure_step_peak", "pareto", "plan"]


def _chain_budget(profile: Profile, budget: Any) -> tuple[int, int]:
    total = parse_budget(budget, baseline_bytes=profile.step_peak_bytes)
    return total, total - profile.outside_bytes


def _problem(profile: Any, who: str) -> Profile | Chain:
    if not isinstance(profile, (Profile, Chain)):
        raise TypeError(
            f"{who}: profile must be a remat.Profile (from remat.profile(model, ...)) or a "
            f"remat.planner.Chain, got {type(profile).__name__} {_short(profile)}"
        )
    return profile


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _budget_hint(budget: Any) -> str:
    return f" (did you mean {budget}%?)" if looks_like_percent(budget) else ""


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
        profile: from :func:`remat.profile` (or a ``remat.planner.Chain``, planned as is).
        budget: bytes, a size (``"6GiB"``, ``"300MB"``) or a percentage of the
            un-checkpointed step's peak (``"40%"``; new bytes, parameters excluded).
        solver: ``"auto"``/``"chain"`` (optimal DP), ``"sqrt"``, ``"every-n"``, ``"greedy"``.
        op_options: give the chain solver each region's op-level menu.
        **options: solver options (``resolution_bytes``, ``nested``, ``n``).

    Returns:
        A ``remat.planner.Plan``; ``predicted_peak_bytes`` includes ``outside_bytes``.

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
    total, chain_budget = _chain_budget(profile, budget)
    baseline = profile.step_peak_bytes
    floor = profile.outside_bytes + min_peak_bytes(chain)
    if chain_budget <= 0:
        raise BudgetError(
            f"remat.plan: budget {describe_bytes(total, baseline)}{_budget_hint(budget)} is "
            "below what lives outside the checkpointable regions "
            f"({describe_bytes(profile.outside_bytes, baseline)}); the smallest feasible "
            f"budget is {describe_bytes(floor, baseline)}",
            min_feasible_bytes=floor,
        )
    try:
        result = plan_chain(chain, chain_budget, solver=solver, **options)
    except BudgetError as err:
        needed = (err.min_feasible_bytes or 0) + profile.outside_bytes
        raise BudgetError(
            f"remat.plan: no {solver} plan fits {describe_bytes(total, baseline)}"
            f"{_budget_hint(budget)}; the smallest feasible budget is "
            f"{describe_bytes(needed, baseline)}",
            min_feasible_bytes=needed,
        ) from None
    return dataclasses.replace(
        result,
        budget_bytes=total,
        predicted_peak_bytes=result.predicted_peak_bytes + profile.outside_bytes,
        meta={
            **result.meta,
            "outside_bytes": profile.outside_bytes,
            "cost_unit": profile.cost_unit,
            "default_regions": profile.meta.get("default_regions", False),
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
    return [
        dataclasses.replace(p, predicted_peak_bytes=p.predicted_peak_bytes + profile.outside_bytes)
        for p in chain_pareto(profile.to_chain(), **options)
    ]


class _PlanPolicy:
    """``remat.apply`` input built from a plan: explicit (fqn, module, treatment) roles."""

    def __init__(self, assignments: list[tuple[str, nn.Module, Treatment]]) -> None:
        self.assignments = assignments

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Treatment]]:
        return self.assignments


def plan_assignments(model: nn.Module, plan: Any) -> list[tuple[str, nn.Module, Treatment]]:
    """The roles ``plan`` gives each module of ``model``, outermost first."""

    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.apply_plan: model must be an nn.Module, got {_short(model)}")
    if not isinstance(plan, Plan):
        hint = " (a loaded plan JSON? remat.Plan.from_dict(it))" if isinstance(plan, dict) else ""
        raise TypeError(
            f"remat.apply_plan: plan must be a remat.Plan (remat.plan, remat.Plan.from_json), "
            f"got {type(plan).__name__} {_short(plan)}{hint}"
        )
    modules = dict(model.named_modules())
    missing = [r.name for r in plan.regions if r.name not in modules]
    if missing:
        raise PlanError(
            f"remat.apply_plan: the plan names regions {missing} that {type(model).__name__} "
            "does not have (was it made for another model?)"
        )
    if plan.meta.get("default_regions"):
        _check_covers(model, plan)
    roles: dict[str, list[Treatment]] = {r.name: [] for r in plan.regions}
    for start, stop in sorted(plan.segments, key=lambda s: (s[0], -s[1])):
        names = [plan.regions[i].name for i in range(start, stop)]
        members = [(n, modules[n]) for n in names]
        for name, _, role in segment_roles(f"{names[0]}-{names[-1]}", members):
            roles[name].append(role)
    for region in plan.regions:
        if region.action == "recompute":
            roles[region.name].append(Recompute())
        elif region.action == "ops":
            roles[region.name].append(
                Ops(save_calls=frozenset(region.save_ops), engine=region.engine)
            )
        elif region.action != "store":
            raise PlanError(f"remat.apply_plan: action {region.action!r} is not supported yet")
    return [(name, modules[name], t) for name, ts in roles.items() for t in ts]


def _check_covers(model: nn.Module, plan: Plan) -> None:
    """A plan made from the default regions of a model covers all of this model's: a plan
    for 4 blocks applied to 6 would silently leave 2 as they are."""

    planned = [r.name for r in plan.regions]
    here = [name for name, _ in default_regions(model)]
    if here != planned:
        extra = [n for n in here if n not in set(planned)]
        raise PlanError(
            f"remat.apply_plan: the plan was made for {len(planned)} regions "
            f"({_names(planned)}) but {type(model).__name__} has {len(here)} "
            f"({_names(here)}"
            + (f"; not in the plan: {_names(extra)}" if extra else "")
            + "). Was it made for another model? Profile and plan this one."
        )


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def apply_plan(model: nn.Module, plan: Any) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (any earlier remat policy is removed first).

    Raises:
        PlanError: the plan does not fit the model (regions it lacks, or, for a plan made
            from a profile's default regions, regions of the model the plan leaves out);
            the model is left as it was.
    """

    assignments = plan_assignments(model, plan)  # before anything changes: it may raise
    remove(model)
    if assignments:
        apply(model, _PlanPolicy(assignments))
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan` (the same as ``remat.remove``)."""

    return remove(model)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoPlan:
    """What :func:`autoplan` chose and measured.

    Attributes:
        plan: the plan, applied to the model.
        profile: the profile it was planned from.
        budget_bytes: the budget in bytes.
        measured_peak_bytes: the applied plan's training-step peak, measured by the tracker
            (new bytes, parameters and inputs excluded); at most ``budget_bytes``.
        rounds: plans tried; more than one when the memory model was optimistic and the
            budget given to the solver had to be tightened by the measured excess.
    """

    plan: Any
    profile: Profile
    budget_bytes: int
    measured_peak_bytes: int
    rounds: int


def autoplan(
    model: nn.Module,
    *inputs: Any,
    budget: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    solver: str = "auto",
    max_rounds: int = 6,
    profile: Profile | None = None,
    **kwargs: Any,
) -> AutoPlan:
    """Profile, plan, apply and measure: a plan whose *measured* peak fits ``budget``.

    The model is called as its training loop calls it: ``model(*inputs, **kwargs)`` (a
    transformers batch: ``autoplan(model, budget="50%", **batch)``), in train mode, with the
    KV cache off, and the loss is the model's own (``out.loss``) unless ``loss_fn`` is given.
    The cache stays off in the model's config afterwards (with a warning), as transformers
    does under gradient checkpointing, so that the measured peak holds in training.
    The model's buffers, gradients and the RNG state are left as they were (profiling and
    measuring run training steps). The chain model predicts the peak; the tracker measures
    it. When the measurement exceeds the budget, the solver is asked again with the budget
    lowered by the excess; when it leaves room (the model is conservative), with the budget
    raised by the room left, keeping the cheapest plan whose measured peak fits. At most
    ``max_rounds`` plans are measured.

    Raises:
        BudgetError: no plan within ``max_rounds`` measured under the budget.
        PlanError: the model is in eval mode.
    """

    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"remat.autoplan: max_rounds must be a positive int, got {max_rounds!r}")
    check_loss_fn(loss_fn, "remat.autoplan")
    if profile is not None and not isinstance(profile, Profile):
        raise TypeError(
            f"remat.autoplan: profile must be a remat.Profile or None, got {_short(profile)}"
        )
    require_train_mode(model, "remat.autoplan")
    loss_of = loss_fn or default_loss
    prof = profile or make_profile(model, *inputs, loss_fn=loss_of, **kwargs)
    total, _ = _chain_budget(prof, budget)
    target = total
    options: dict[str, Any] = {}
    best: tuple[Any, int] | None = None
    least: int | None = None  # the lowest peak measured: a budget that is feasible
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        try:
            chosen = plan(prof, target, solver=solver, **options)
        except BudgetError as err:
            floor = err.min_feasible_bytes or 0
            if best is not None or floor <= target:
                break
            # The model says nothing fits, but it is conservative: measure its least-memory
            # plan, which may well fit.
            target = floor
            continue
        apply_plan(model, chosen)
        with state_kept(model), training_call(model):  # nor train BatchNorm statistics
            measured = measure_step_peak(model, inputs, loss_of, **kwargs)
        least = measured if least is None else min(least, measured)
        if measured <= total:
            if best is None or chosen.extra_cost < best[0].extra_cost:
                best = (chosen, measured)
            slack = total - measured
            if slack <= total // 100:
                break
            target += slack  # the model overestimated: let the solver use what is left
        elif best is not None:
            break  # a cheaper plan did not fit; keep the one that did
        elif chosen.segments and solver in ("auto", "chain") and not options:
            options = {"nested": False}  # first try without multi-region segments
        else:
            target -= measured - total
    if best is not None:
        chosen, measured = best
        apply_plan(model, chosen)
        cache_off(model, "remat.autoplan")
        return AutoPlan(plan=chosen, profile=prof, budget_bytes=total,
                        measured_peak_bytes=measured, rounds=rounds)  # fmt: skip
    remove_plan(model)
    baseline = prof.step_peak_bytes
    raise BudgetError(
        f"remat.autoplan: no plan measured within the budget {describe_bytes(total, baseline)}"
        f"{_budget_hint(budget)} in {rounds} tries"
        + (
            f"; the lowest peak measured was {describe_bytes(least, baseline)}"
            if least is not None
            else ""
        ),
        min_feasible_bytes=least,
    )
