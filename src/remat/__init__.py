"""remat: activation checkpointing (rematerialization) for PyTorch.

The public API, grouped by pipeline stage (see DESIGN.md): engine, measure, models, errors.
"""

from remat.checkpoint import CheckpointFunction, checkpoint, checkpoint_sequential
from remat.errors import BudgetError, CheckpointError, PlanError, RematError

__version__ = "0.1.0"

__all__ = [
    # errors
    "BudgetError",
    # engine
    "CheckpointError",
    "CheckpointFunction",
    "PlanError",
    "RematError",
    "checkpoint",
    "checkpoint_sequential",
]
