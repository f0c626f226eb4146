"""Plans on models: ``plan``/``pareto`` on a profile (``planning``), ``apply_plan``
(``applying``), ``autoplan`` (``autoplanning``), ``load_plan`` (``plan_files``), ``estimate``
(``estimation``), a rank's training state (``training_state``) and FSDP sharding
(``sharding``), each imported from its module (``remat`` exports them); this package's top
level stays free of torch models.

The chain problem and its solvers (``Chain``, ``Region``, ``plan_chain``, ``pareto``, ...)
moved to :mod:`remat.solver`; their names here still work, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    solver = importlib.import_module("remat.solver")
    if name in solver.__all__:
        warnings.warn(
            f"remat.planner.{name} moved to remat.solver.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(solver, name)
    raise AttributeError(f"module 'remat.planner' has no attribute {name!r}")
