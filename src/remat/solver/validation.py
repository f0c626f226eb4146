"""The checks the solver's plain data runs on its fields: byte counts and costs, each
error naming the owner, the field and the bad value. ``problem`` (``Region``, ``Chain``),
``shared_input`` and ``solution`` validate with them in ``__post_init__``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_bytes", "check_cost"]


def check_bytes(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative int of bytes, got {value!r}")


def check_cost(owner: str, name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite non-negative number, got {value!r}")
