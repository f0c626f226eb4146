"""A plan checked on the model it was made for: applied to a copy, one training step
measured, its gradients compared with an un-checkpointed copy's. What ``remat plan
--verify`` runs; the comparison is the bench's (:mod:`remat.measure.comparison`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from remat.measure.comparison import close, compare_tensors
from remat.measure.training_call import check_loss_fn, default_loss, require_train_mode
from remat.planner.applying import apply_plan
from remat.policy.offload_stores import CpuStore, OffloadStore
from remat.profiling.step import measure_step_peak
from remat.solver.solution import Plan
from remat.solver.units import fmt_small

__all__ = ["PlanCheck", "verify_plan"]


@dataclass(frozen=True)
class PlanCheck:
    """What one step of a planned copy measured against the plan and an un-checkpointed copy.

    Attributes:
        measured_peak_bytes: the step's peak in new bytes (parameters and inputs excluded,
            the profile's convention), measured with ``MemoryTracker``.
        predicted_peak_bytes: the plan's prediction of it.
        budget_bytes: the budget the plan was made for (``None``: a frontier point).
        loss_difference: absolute difference of the two copies' losses.
        max_gradient_difference: the largest absolute element difference of any gradient.
        mismatched: the parameters whose gradients differ beyond ``assert_close``'s
            tolerances (``"loss"`` when the losses do).
    """

    measured_peak_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int | None
    loss_difference: float
    max_gradient_difference: float
    mismatched: tuple[str, ...]

    @property
    def within_budget(self) -> bool:
        return self.budget_bytes is None or self.measured_peak_bytes <= self.budget_bytes

    @property
    def within_prediction(self) -> bool:
        return self.measured_peak_bytes <= self.predicted_peak_bytes

    @property
    def gradients_equal(self) -> bool:
        return not self.mismatched

    @property
    def ok(self) -> bool:
        """Within the budget and the prediction, with equal loss and gradients."""
        return self.within_budget and self.within_prediction and self.gradients_equal

    def __str__(self) -> str:
        budget = self.budget_bytes
        where = "" if budget is None else "within" if self.within_budget else "OVER"
        where = f", {where} the budget {budget / 1e6:.2f} MB" if budget is not None else ""
        over = "" if self.within_prediction else ", OVER its prediction"
        grads = "equal" if self.gradients_equal else f"DIFFER ({', '.join(self.mismatched[:3])})"
        return (
            f"measured peak {self.measured_peak_bytes / 1e6:.2f} MB{where}{over} (predicted "
            f"{self.predicted_peak_bytes / 1e6:.2f} MB); gradients {grads}, largest "
            f"difference {fmt_small(self.max_gradient_difference)}"
        )


def verify_plan(
    model: nn.Module,
    plan: Plan,
    *inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
    offload_store: OffloadStore | None = None,
    **kwargs: Any,
) -> PlanCheck:
    """Apply ``plan`` to a copy of ``model``, measure one training step's peak, and compare
    its loss and gradients with an un-checkpointed copy's; ``model`` is left as it is.

    Args:
        model: the model the plan was made for, in train mode, on a device that runs
            (not meta). Each copy is a ``copy.deepcopy``: the model's memory twice over.
        plan: a plan from :func:`remat.plan` (or loaded with ``Plan.from_json``).
        inputs: the model's positional inputs, as given to :func:`remat.profile`.
        loss_fn: model output -> scalar loss (``None``: as :func:`remat.profile`).
        seed: both copies draw their random numbers (dropout) from it.
        offload_store: for a plan that offloads (``None``: pinned host memory on CUDA, a
            ``CpuStore`` on CPU, whose copies free the originals as a GPU's would).
        kwargs: the model's keyword inputs.

    Raises:
        ValueError: ``model`` is on the meta device.
        PlanError: the model is in eval mode, or the plan does not fit it.
    """
    check_loss_fn(loss_fn, "remat.verify_plan")
    require_train_mode(model, "remat.verify_plan")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError(
            "remat.verify_plan runs the model: it is on the meta device; verify on cpu or cuda"
        )
    loss_of = loss_fn or default_loss
    if offload_store is None and device.type == "cpu":
        offload_store = CpuStore()
    reference, planned = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(planned, plan, offload_store=offload_store)  # before any step: it may raise
    measured = measure_step_peak(planned, inputs, loss_of, **kwargs)
    losses, grads = [], []
    for copied in (reference, planned):
        copied.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            loss = loss_of(copied(*inputs, **kwargs))
            loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in copied.named_parameters()})
    _, max_diff, mismatched = compare_tensors(*grads)
    loss_same = close(losses[1], losses[0])
    return PlanCheck(
        measured_peak_bytes=measured,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        budget_bytes=plan.budget_bytes,
        loss_difference=(losses[1].double() - losses[0].double()).abs().item(),
        max_gradient_difference=max_diff,
        mismatched=tuple(mismatched) + (() if loss_same else ("loss",)),
    )
