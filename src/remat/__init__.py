"""remat: activation checkpointing (rematerialization) for PyTorch.

The public API, grouped by pipeline stage (see DESIGN.md): engine, measure, models, errors.
"""

from remat.checkpoint import CheckpointFunction, checkpoint, checkpoint_sequential
from remat.errors import BudgetError, CheckpointError, PlanError, RematError
from remat.estimate import EstimateReport, estimate
from remat.memory import (
    MemoryTracker,
    SavedActivation,
    SavedActivationTable,
    TimelineEvent,
    saved_activations,
)

__version__ = "0.1.0"

__all__ = [
    # errors
    "BudgetError",
    # engine
    "CheckpointError",
    "CheckpointFunction",
    # measure
    "EstimateReport",
    "MemoryTracker",
    "PlanError",
    "RematError",
    "SavedActivation",
    "SavedActivationTable",
    "TimelineEvent",
    "checkpoint",
    "checkpoint_sequential",
    "estimate",
    "saved_activations",
]
