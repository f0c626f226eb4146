"""remat's exception hierarchy.

Every error remat raises on purpose is a ``RematError``, so callers can catch remat's
failures without catching unrelated bugs. Each subclass names one stage of the pipeline.

The rule for bad input, everywhere: a wrong type raises ``TypeError``, a wrong value
``ValueError``, a plan and the model or profile it is applied to that disagree
``PlanError``; each message names the function and the argument (or module) at fault.
``check_choice`` and ``check_bool`` say it the same way for every option.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = [
    "BudgetError",
    "CheckpointError",
    "MissingExtraError",
    "PlanError",
    "RematError",
    "check_bool",
    "check_choice",
]


def check_choice(owner: str, name: str, value: object, choices: Collection[str]) -> None:
    """Raise ``TypeError`` unless ``value`` is a str, ``ValueError`` unless it is one of
    ``choices``: "``owner``: ``name``='x' is not one of 'a', 'b'"."""
    options = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(
            f"{owner}: {name} must be a str, one of {options}; got {type(value).__name__}"
        )
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {options}")


def check_bool(owner: str, name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


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
