"""remat: activation checkpointing (rematerialization) for PyTorch.

The public API, grouped by pipeline stage (see ARCHITECTURE.md): engine, measure, apply,
errors. Heavy optional dependencies (matplotlib, rich, transformers) are imported lazily by
the modules that need them, never here.
"""

from remat.engine.checkpointing import CheckpointFunction, checkpoint, checkpoint_sequential
from remat.errors import BudgetError, CheckpointError, PlanError, RematError
from remat.measure.allocations import AllocationTracker
from remat.measure.saved import SavedActivation, SavedActivationTable, saved_activations
from remat.measure.tracker import MemoryTracker, TimelineEvent
from remat.planner.applying import apply_plan
from remat.planner.autoplanning import AutoPlan, autoplan
from remat.planner.estimation import EstimateReport, estimate
from remat.planner.fitting import FitResult, FitRow, fit
from remat.planner.plan_files import load_plan
from remat.planner.planning import pareto, plan, plan_from_choices
from remat.planner.verification import PlanCheck, verify_plan
from remat.policy.compiling import compile
from remat.policy.offload_stores import CpuStore, CudaPinnedStore, OffloadStats, OffloadStore
from remat.policy.offloading import Offload, offload
from remat.policy.op_level import Ops, ops
from remat.policy.segment import Segments, segments, sqrt
from remat.policy.selectors import Selector, by_name, by_type, every, where
from remat.policy.treatments import Policy, Recompute, Treatment, recompute
from remat.policy.wrapping import applied, apply, remove
from remat.profiling.profile_data import Profile
from remat.profiling.profiler import profile
from remat.solver import Chain, Plan, Region, RegionOption, parse_budget, plan_chain
from remat.targets.devices import TARGETS, Target

__version__ = "0.1.0"

__all__ = [
    # engine
    "CheckpointFunction",
    "checkpoint",
    "checkpoint_sequential",
    # measure
    "AllocationTracker",
    "EstimateReport",
    "MemoryTracker",
    "SavedActivation",
    "SavedActivationTable",
    "TimelineEvent",
    "estimate",
    "saved_activations",
    # apply: policies and their application
    "Ops",
    "Policy",
    "Recompute",
    "Selector",
    "Treatment",
    "applied",
    "apply",
    "compile",
    "by_name",
    "by_type",
    "every",
    "ops",
    "recompute",
    "remove",
    "Segments",
    "segments",
    "sqrt",
    "where",
    "CpuStore",
    "CudaPinnedStore",
    "Offload",
    "OffloadStats",
    "OffloadStore",
    "offload",
    # profile and plan
    "AutoPlan",
    "Chain",
    "Plan",
    "PlanCheck",
    "Profile",
    "Region",
    "RegionOption",
    "apply_plan",
    "autoplan",
    "fit",
    "FitResult",
    "FitRow",
    "load_plan",
    "TARGETS",
    "Target",
    "pareto",
    "parse_budget",
    "plan",
    "plan_chain",
    "plan_from_choices",
    "profile",
    "verify_plan",
    # errors
    "BudgetError",
    "CheckpointError",
    "PlanError",
    "RematError",
]
