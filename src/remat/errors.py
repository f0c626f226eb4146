"""remat's exception hierarchy.

Every error remat raises on purpose is a ``RematError``, so callers can catch remat's
failures without catching unrelated bugs. Each subclass names one stage of the pipeline.
"""

from __future__ import annotations

__all__ = ["BudgetError", "CheckpointError", "MissingExtraError", "PlanError", "RematError"]


class RematError(RuntimeError):
    """Base class of every error remat raises on purpose."""


class CheckpointError(RematError):
    """The checkpoint engine cannot reproduce the forward pass exactly.

    Raised when recomputation saves different tensors than the forward did, or when an
    engine is asked to do something it cannot do correctly (it never returns a wrong
    gradient instead).
    """


class PlanError(RematError):
    """A plan does not fit the model or profile it is applied to."""


class BudgetError(PlanError):
    """No plan fits the memory budget.

    Attributes:
        min_feasible_bytes: the smallest budget, in bytes, for which a plan exists.
    """

    def __init__(self, message: str, *, min_feasible_bytes: int | None = None) -> None:
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes


class MissingExtraError(RematError, ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""
