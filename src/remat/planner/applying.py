"""From a plan to a checkpointed model: ``remat.apply_plan(model, plan)``.

Regions the plan recomputes get :class:`~remat.policy.treatments.Recompute`, op-level
choices get :class:`~remat.policy.op_level.Ops` with the chosen calls, offloaded regions share
one :class:`~remat.policy.offloading.Offload` (every storage but the region's inputs moves,
each region's tensors come back when its backward starts: what the memory model counts), and
multi-region segments become :mod:`remat.policy.segment` members (nested segments nest).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from remat.errors import PlanError
from remat.measure.training_call import cache_off
from remat.planner.planning import short_repr
from remat.policy.offload_stores import OffloadStore
from remat.policy.offloading import Offload
from remat.policy.op_level import Ops
from remat.policy.segment import segment_roles
from remat.policy.treatments import Recompute, Treatment
from remat.policy.wrapping import apply, remove
from remat.profiling.regions import default_regions
from remat.solver.solution import Plan, offloaded_in_segments

__all__ = ["apply_plan", "plan_assignments", "remove_plan"]


class _PlanPolicy:
    """``remat.apply`` input built from a plan: explicit (fqn, module, treatment) roles."""

    def __init__(self, assignments: list[tuple[str, nn.Module, Treatment]]) -> None:
        self.assignments = assignments

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Treatment]]:
        return self.assignments


def plan_assignments(
    model: nn.Module, plan: Any, offload_store: OffloadStore | None = None
) -> list[tuple[str, nn.Module, Treatment]]:
    """The roles ``plan`` gives each module of ``model``, outermost first."""

    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.apply_plan: model must be an nn.Module, got {short_repr(model)}")
    if not isinstance(plan, Plan):
        hint = " (a loaded plan JSON? remat.Plan.from_dict(it))" if isinstance(plan, dict) else ""
        raise TypeError(
            f"remat.apply_plan: plan must be a remat.Plan (remat.plan, remat.Plan.from_json), "
            f"got {type(plan).__name__} {short_repr(plan)}{hint}"
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
    offload = _offload_for(model, plan, offload_store)
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
        elif region.action == "offload":
            roles[region.name].append(offload)
        elif region.action != "store":
            raise PlanError(f"remat.apply_plan: action {region.action!r} is not supported yet")
    return [(name, modules[name], t) for name, ts in roles.items() for t in ts]


def _offload_for(model: nn.Module, plan: Plan, store: OffloadStore | None) -> Offload | None:
    """The one treatment of the plan's offloaded regions; they must lie outside segments,
    whose rerun in backward offloads nothing."""
    names = [r.name for r in plan.regions if r.action == "offload"]
    if not names:
        return None
    actions = [r.action for r in plan.regions]
    inside = [plan.regions[i].name for i in offloaded_in_segments(actions, plan.segments)]
    if inside:
        raise PlanError(
            f"remat.apply_plan: the plan offloads {inside} inside a checkpointed segment, "
            "which reruns them in backward without offloading; offload outside segments"
        )
    if store is not None and not isinstance(store, OffloadStore):
        raise TypeError(
            f"remat.apply_plan: offload_store must be an OffloadStore (remat.CpuStore()), "
            f"got {short_repr(store)}"
        )
    devices = {p.device.type for p in model.parameters()}
    if store is None and "cuda" not in devices:
        raise PlanError(
            f"remat.apply_plan: the plan offloads {_names(names)} to host memory, but "
            f"{type(model).__name__} is on {', '.join(sorted(devices)) or 'no device'}, "
            "where the default store moves nothing: move the model to CUDA, or pass "
            "offload_store=remat.CpuStore() to copy anyway"
        )
    return Offload(min_bytes=0, store=store, prefetch="own", keep_inputs=True)


def _check_covers(model: nn.Module, plan: Plan) -> None:
    """A plan made from the default regions of a model covers all of this model's: a plan
    for 4 blocks applied to 6 would silently leave 2 as they are. Those the profiled
    forward did not run (a vision tower on text input) are not in the plan."""

    planned = [r.name for r in plan.regions]
    not_run = set(plan.meta.get("regions_not_run", ()))
    here = [name for name, _ in default_regions(model) if name not in not_run]
    if sorted(here) != sorted(planned):  # the profile puts them in forward order
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


def apply_plan(
    model: nn.Module, plan: Any, *, offload_store: OffloadStore | None = None
) -> nn.Module:
    """Apply ``plan`` to ``model`` in place (any earlier remat policy is removed first).

    Args:
        model: the model the plan was made for.
        plan: a :class:`~remat.solver.solution.Plan`.
        offload_store: where the plan's offloaded regions put their saved tensors
            (``None``: pinned host memory, for a model on CUDA; ``remat.CpuStore()`` copies
            on any device, e.g. to check a GPU plan's bytes on CPU).

    A transformers model's KV cache is turned off in its config (with a warning), as
    transformers does under gradient checkpointing: the plan's peak was predicted without it.

    Raises:
        PlanError: the plan does not fit the model (regions it lacks, or, for a plan made
            from a profile's default regions, regions of the model the plan leaves out),
            or it offloads regions inside a segment, or off CUDA without ``offload_store``;
            the model is left as it was.
    """

    assignments = plan_assignments(model, plan, offload_store)  # before any change: it may raise
    remove(model)
    if assignments:
        apply(model, _PlanPolicy(assignments))
    # The plan's peak was predicted without the KV cache (remat.profile's training call),
    # which would hold every layer's keys and values, checkpointed or not, until the step ends.
    cache_off(model, "remat.apply_plan")
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan` (the same as ``remat.remove``)."""

    return remove(model)
