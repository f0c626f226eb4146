"""Plans saved to files: ``remat.load_plan(path)`` reads ``Plan.to_json``'s file or the
report ``remat plan --json`` writes, so a plan made once (on the command line, on another
machine) is applied in the training script with ``remat.apply_plan(model, plan)``.
"""

from __future__ import annotations

import json
import os

from remat.errors import PlanError
from remat.solver.solution import Plan

__all__ = ["load_plan", "read_plan_file"]


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """The plan saved at ``path``.

    Args:
        path: a file written by ``plan.to_json()`` or by ``remat plan --json`` (a report
            whose ``"plan"`` field is the plan).

    Returns:
        The :class:`~remat.solver.solution.Plan`, to give :func:`remat.apply_plan`.

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: there is no such file, or it cannot be read.
        PlanError: the file is not a plan (not JSON, or the field at fault named).

    Example:
        >>> plan = remat.load_plan("plan.json")  # remat plan ... --json plan.json
        >>> remat.apply_plan(model, plan)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"remat.load_plan: path must be a str or os.PathLike, got {type(path).__name__} "
            f"{path!r}"
        )
    return read_plan_file(path, f"remat.load_plan: {os.fspath(path)}")


def read_plan_file(path: str | os.PathLike[str], where: str) -> Plan:
    """:func:`load_plan`, its messages opening with ``where`` (the caller and the path:
    ``remat bench``'s ``"configuration plan:plan.json"``)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"{where}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise PlanError(f"{where}: not a plan file, not text ({err.reason})") from None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise PlanError(f"{where}: not JSON ({err})") from None
    try:
        return Plan.from_dict(data)
    except (PlanError, TypeError) as err:  # TypeError: a field of the wrong kind
        raise PlanError(f"{where}: {err}") from None
