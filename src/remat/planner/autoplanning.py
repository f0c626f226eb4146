"""``remat.autoplan``: profile, plan, apply and measure, until the measured peak fits.

The chain model predicts a plan's peak; the tracker measures it. autoplan asks the solver
again with the budget corrected by what the measurement says, and keeps the cheapest plan
whose measured peak fits. Everything that can be checked before the profile's minutes is.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.errors import BudgetError, check_choice
from remat.measure.training_call import (
    check_loss_fn,
    default_loss,
    require_train_mode,
    training_call,
)
from remat.planner.applying import apply_plan, remove_plan
from remat.planner.planning import plan, plan_from_choices, short_repr, split_budget
from remat.policy.compiling import compiled_step_peak
from remat.profiling.compiled_costs import compiled_costs
from remat.profiling.profile_data import Profile
from remat.profiling.profiler import profile as make_profile
from remat.profiling.step import measure_step_peak, state_kept
from remat.solver import SOLVERS, min_peak_bytes
from remat.solver.budget import check_budget_value, describe_bytes, parse_budget
from remat.solver.compile_budget import activation_share
from remat.solver.solution import Plan
from remat.solver.units import fmt_bytes

__all__ = ["AutoPlan", "autoplan"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoPlan:
    """What :func:`autoplan` chose and measured.

    ``str()`` says it in a few lines: the budget, the measured and predicted peaks, the
    rounds and how many regions are stored, recomputed, op-level or offloaded
    (``print(result.plan)`` prints the plan's table).

    Attributes:
        plan: the plan, applied to the model. When the un-checkpointed step already fits
            the budget, a plan that stores every region: nothing is checkpointed.
        profile: the profile it was planned from (left out of ``repr()``: it is long);
            with ``compile=True``, its costs as a compiled backward pays them.
        budget_bytes: the budget in bytes.
        measured_peak_bytes: the applied plan's training-step peak, measured by the tracker
            (new bytes, parameters and inputs excluded); at most ``budget_bytes``.
        rounds: plans measured; more than one when the memory model was optimistic and the
            budget given to the solver had to be tightened by the measured excess (or was
            conservative and it could be loosened). 1 when the un-checkpointed step already
            fits: that step is the one plan measured.
        compiled: the peaks are of the model under ``torch.compile`` (``compile=True``),
            measured from the allocators' events; a percentage budget is then of the
            compiled model's peak without recomputation.
        activation_share: the activations the plan keeps from forward to backward over
            those kept with nothing recomputed: the plan's budget in the unit of
            ``torch._functorch.config.activation_memory_budget`` (torchtitan's
            ``memory_budget``).
    """

    plan: Plan
    profile: Profile = dataclasses.field(repr=False)
    budget_bytes: int
    measured_peak_bytes: int
    rounds: int
    compiled: bool = False
    activation_share: float = 1.0

    def __str__(self) -> str:
        actions = Counter(r.action for r in self.plan.regions)
        what = (
            f"{actions['store']} stored, {actions['recompute']} recomputed, "
            f"{actions['ops']} op-level, {actions['offload']} offloaded"
        )
        if self.plan.segments:
            what += f"; {len(self.plan.segments)} multi-region segment(s)"
        nothing = len(actions) == 1 and "store" in actions and not self.plan.segments
        return "\n".join(
            [
                f"AutoPlan: measured peak {fmt_bytes(self.measured_peak_bytes)}"
                + (" compiled" if self.compiled else "")
                + f" within the budget {fmt_bytes(self.budget_bytes)} (predicted "
                f"{fmt_bytes(self.plan.predicted_peak_bytes)} eager), {self.rounds} round(s)",
                f"regions: {what}" + (" (nothing checkpointed)" if nothing else ""),
                f"keeps {self.activation_share:.0%} of the activations (torch.compile's "
                f"activation_memory_budget={self.activation_share:.2f})",
            ]
        )


def autoplan(
    model: nn.Module,
    *inputs: Any,
    budget: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    solver: str = "auto",
    max_rounds: int = 6,
    profile: Profile | None = None,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
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

    When the un-checkpointed step's peak already fits the budget, nothing is checkpointed
    (any earlier plan is removed) and a ``UserWarning`` says so.

    With ``compile=True`` the plans are measured as the model trains under
    ``torch.compile`` (:func:`remat.policy.compiling.compiled_step_peak`: each plan
    compiled after ``torch._dynamo.reset()``, its peak read from the allocators' events),
    and a percentage budget is of the compiled model's peak without recomputation. The
    solver plans with the costs a compiled backward pays
    (:func:`remat.profiling.compiled_costs.compiled_costs`: matmuls, convolutions and
    attention as profiled, the ops Inductor fuses free) and the eager bytes; the
    measurements correct its budget as in eager.
    Compile the model afterwards with :func:`remat.compile`.

    Args:
        model: the model, on the device it trains on (not ``meta``: autoplan runs it).
        *inputs: its positional inputs.
        budget: bytes (``int``, at least 101), a size (``"6GiB"``, ``"300MB"``) or a
            percentage of the un-checkpointed step's peak (``"40%"``).
        loss_fn: model output -> scalar loss; ``None``: the model's own ``out.loss``.
        solver: one of ``remat.solver.SOLVERS`` (``"auto"``: the optimal chain DP).
        max_rounds: the most plans measured.
        profile: the model's profile, if already made (it is made otherwise).
        compile: plan for training under ``torch.compile`` (see above).
        compile_options: ``torch.compile``'s keyword arguments for the measured steps.
        **kwargs: its keyword inputs.

    Returns:
        An :class:`AutoPlan`; its plan is applied to ``model``.

    Raises:
        TypeError: ``model``, ``budget``, ``solver``, ``max_rounds``, ``loss_fn`` or
            ``profile`` has a wrong type.
        ValueError: ``budget`` cannot be meant (``40``: did you mean 40%?; a string that
            does not parse; not positive), an unknown ``solver``, ``max_rounds`` below 1,
            or a model on the meta device. All raised at once, before profiling.
        PlanError: the model is in eval mode.
        BudgetError: no plan within ``max_rounds`` measured under the budget; the message
            says what bounds the peak, ``min_feasible_bytes`` is the lowest peak measured.

    Example:
        >>> result = remat.autoplan(model, x, budget="50%", loss_fn=lambda out: out.mean())
        >>> print(result)
    """
    _check_arguments(model, inputs, kwargs, budget, loss_fn, solver, max_rounds, profile)
    _check_compile(compile, compile_options)
    loss_of = loss_fn or default_loss
    prof = profile or make_profile(model, *inputs, loss_fn=loss_of, **kwargs)
    if compile:  # recomputing what Inductor fuses costs nothing: plan by the matmuls
        prof = compiled_costs(prof)
    total, _ = split_budget(prof, budget)

    def measure(chosen: Plan) -> int:
        apply_plan(model, chosen)
        with state_kept(model), training_call(model):  # nor train BatchNorm statistics
            if compile:
                return compiled_step_peak(model, inputs, loss_of, kwargs, **(compile_options or {}))
            return measure_step_peak(model, inputs, loss_of, **kwargs)

    def result(chosen: Plan, measured: int, rounds: int) -> AutoPlan:
        share = activation_share(prof.to_chain(), chosen)
        return AutoPlan(
            plan=chosen,
            profile=prof,
            budget_bytes=total,
            measured_peak_bytes=measured,
            rounds=rounds,
            compiled=compile,
            activation_share=share,
        )

    least: int | None = None  # the lowest peak measured: a budget that is feasible
    rounds = 0
    nothing = plan_from_choices(prof, ["store"] * len(prof.regions))
    search_baseline = 0
    if compile:  # the compiled peak is the baseline: Inductor's fusions change it
        least, rounds = measure(nothing), 1
        search_baseline = least
        total = parse_budget(budget, baseline_bytes=least, name="remat.autoplan: budget")
    if prof.step_peak_bytes <= total or compile:
        nothing = dataclasses.replace(nothing, budget_bytes=total, solver="none")
        if least is None:
            least, rounds = measure(nothing), 1
        if least <= total:
            warnings.warn(
                f"remat.autoplan: nothing to checkpoint: the un-checkpointed step's peak "
                f"{describe_bytes(least)} fits the budget {describe_bytes(total)}; the model "
                "runs as it is (any earlier plan removed)",
                UserWarning,
                stacklevel=2,
            )
            return result(nothing, least, 1)
    search = _Search(prof, total, solver, measure, least=least, rounds=rounds)
    best = search.run(max_rounds)
    if best is not None:
        chosen, measured = best
        apply_plan(model, chosen)
        return result(chosen, measured, search.rounds)
    remove_plan(model)
    baseline = search_baseline if compile else prof.step_peak_bytes
    raise BudgetError(
        f"remat.autoplan: no plan measured within the budget {describe_bytes(total, baseline)}"
        f" in {search.rounds} tries"
        + (
            f"; the lowest peak measured was {describe_bytes(search.least, baseline)}"
            if search.least is not None
            else ""
        )
        + f". {_bounds(prof)}",
        min_feasible_bytes=search.least,
    )


class _Search:
    """The rounds of plan, apply, measure: the solver's budget corrected by each
    measurement, the cheapest plan measured within ``total`` kept."""

    def __init__(
        self,
        prof: Profile,
        total: int,
        solver: str,
        measure: Callable[[Plan], int],
        *,
        least: int | None,
        rounds: int,
    ) -> None:
        self.prof, self.total, self.solver, self.measure = prof, total, solver, measure
        self.least, self.rounds = least, rounds

    def run(self, max_rounds: int) -> tuple[Plan, int] | None:
        """The cheapest plan measured within the budget and its peak, or ``None``."""
        total, solver = self.total, self.solver
        target = total
        options: dict[str, Any] = {}
        best: tuple[Plan, int] | None = None
        while self.rounds < max_rounds:
            self.rounds += 1
            try:
                chosen = plan(self.prof, target, solver=solver, **options)
            except BudgetError as err:
                floor = err.min_feasible_bytes or 0
                if best is not None or floor <= target:
                    break
                # The model says nothing fits, but it is conservative: measure its
                # least-memory plan, which may well fit.
                target = floor
                continue
            measured = self.measure(chosen)
            self.least = measured if self.least is None else min(self.least, measured)
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
        return best


def _bounds(prof: Profile) -> str:
    """What bounds the peak, from the profile: the least the memory model predicts for any
    plan of the regions, and what lives outside them, which no checkpointing of them removes."""
    floor = prof.step_peak_for(min_peak_bytes(prof.to_chain()))
    parts = []
    if prof.tail_bytes:
        parts.append(f"the head and loss alone need {fmt_bytes(prof.tail_bytes)} after them")
    if prof.outside_bytes:
        parts.append(
            f"{fmt_bytes(prof.outside_bytes)} lives beside them (what ran before them, "
            "inputs they share)"
        )
    if prof.unplannable_bytes:
        parts.append(
            f"the step peaks at {fmt_bytes(prof.unplannable_bytes)} before their forward "
            "or after their backward"
        )
    return (
        f"No checkpointing of the blocks ({len(prof.regions)} regions) goes below "
        f"{describe_bytes(floor, prof.step_peak_bytes)}, predicted (offloading aside)"
        + (f": {'; '.join(parts)}" if parts else "")
    )


def _check_compile(compile: Any, options: Any) -> None:
    if not isinstance(compile, bool):
        raise TypeError(f"remat.autoplan: compile must be a bool, got {short_repr(compile)}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(
            f"remat.autoplan: compile_options must be a dict of torch.compile's keyword "
            f"arguments or None, got {short_repr(options)}"
        )
    if options and not compile:
        raise ValueError("remat.autoplan: compile_options given without compile=True")


def _check_arguments(
    model: Any,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    budget: Any,
    loss_fn: Any,
    solver: Any,
    max_rounds: Any,
    profile: Any,
) -> None:
    """Every check that needs no profile, so that a mistake is told at once, not after
    the profile's minutes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.autoplan: model must be an nn.Module, got {short_repr(model)}")
    check_budget_value(budget, "remat.autoplan: budget")
    check_choice("remat.autoplan", "solver", solver, SOLVERS)
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int):
        raise TypeError(f"remat.autoplan: max_rounds must be an int, got {short_repr(max_rounds)}")
    if max_rounds < 1:
        raise ValueError(f"remat.autoplan: max_rounds must be a positive int, got {max_rounds!r}")
    check_loss_fn(loss_fn, "remat.autoplan")
    if profile is not None and not isinstance(profile, Profile):
        raise TypeError(
            f"remat.autoplan: profile must be a remat.Profile or None, got {short_repr(profile)}"
        )
    tensors = (v for v in (*inputs, *kwargs.values()) if isinstance(v, torch.Tensor))
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers(), tensors)):
        raise ValueError(
            f"remat.autoplan: {type(model).__name__} (or an input) is on the meta device, but "
            "autoplan measures each plan by running the model. On meta, plan for the device "
            'it will train on: prof = remat.profile(model, ..., target_device="h100"); '
            "plan = remat.plan(prof, budget); then remat.apply_plan(model, plan) once the "
            "model is on that device"
        )
    require_train_mode(model, "remat.autoplan")
