"""``remat.autoplan``: profile, plan, apply and measure, until the measured peak fits.

The chain model predicts a plan's peak; the tracker measures it. autoplan asks the solver
again with the budget corrected by what the measurement says, and keeps the cheapest plan
whose measured peak fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.errors import BudgetError
from remat.measure.training_call import (
    check_loss_fn,
    default_loss,
    require_train_mode,
    training_call,
)
from remat.planner.applying import apply_plan, remove_plan
from remat.planner.planning import budget_hint, plan, short_repr, split_budget
from remat.profiling.profile_data import Profile
from remat.profiling.profiler import profile as make_profile
from remat.profiling.step import measure_step_peak, state_kept
from remat.solver.budget import describe_bytes

__all__ = ["AutoPlan", "autoplan"]


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
            f"remat.autoplan: profile must be a remat.Profile or None, got {short_repr(profile)}"
        )
    require_train_mode(model, "remat.autoplan")
    loss_of = loss_fn or default_loss
    prof = profile or make_profile(model, *inputs, loss_fn=loss_of, **kwargs)
    total, _ = split_budget(prof, budget)
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
        return AutoPlan(plan=chosen, profile=prof, budget_bytes=total,
                        measured_peak_bytes=measured, rounds=rounds)  # fmt: skip
    remove_plan(model)
    baseline = prof.step_peak_bytes
    raise BudgetError(
        f"remat.autoplan: no plan measured within the budget {describe_bytes(total, baseline)}"
        f"{budget_hint(budget)} in {rounds} tries"
        + (
            f"; the lowest peak measured was {describe_bytes(least, baseline)}"
            if least is not None
            else ""
        ),
        min_feasible_bytes=least,
    )
