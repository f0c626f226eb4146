"""Memory budgets as users write them: ``"6GiB"``, ``"512MB"``, ``123456`` or ``"40%"``."""

from __future__ import annotations

import math
import re

from remat.solver.units import fmt_bytes

__all__ = [
    "check_budget_value",
    "describe_bytes",
    "looks_like_percent",
    "parse_budget",
    "percent_meant",
]

# SI units are powers of 1000, IEC units powers of 1024 (as in `ls --si` / `ls -h`).
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def describe_bytes(n: int, baseline_bytes: int | None = None) -> str:
    """``n`` bytes as people read them: ``"52,300,000 B (52.3 MB, 30% of the step's peak)"``
    (kB, MB or GB, powers of 1000, by size)."""
    text = f"{n:,} B ({fmt_bytes(n)}"
    if baseline_bytes:
        text += f", {100 * n / baseline_bytes:.0f}% of the un-checkpointed step's peak"
    return text + ")"


def looks_like_percent(budget: int | float | str) -> bool:
    """A bare number of at most 100 given as a budget: bytes by the rules, a percentage by
    intent (``--budget 40``: 40 bytes fit no model)."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        return False
    return 0 < value <= 100


def percent_meant(budget: int | float | str) -> str | None:
    """The percentage a bare number of at most 100 most likely means: ``40`` -> ``"40%"``,
    a fraction below 1 -> its percentage (``0.5`` -> ``"50%"``); ``None`` for any other
    budget."""
    if not looks_like_percent(budget):
        return None
    value = float(budget)
    return f"{100 * value if value < 1 else value:g}%"


def check_budget_value(budget: object, who: str) -> None:
    """Raise unless ``budget`` can be meant, before anything runs (no baseline needed).

    One check for the Python API and the command line, so both say the same thing.

    Args:
        budget: the budget as given.
        who: the caller and argument as the message names them: ``"remat.autoplan: budget"``,
            ``"--budget"``.

    Raises:
        TypeError: ``budget`` is neither a number nor a string.
        ValueError: a bare number of at most 100 (bytes by the rules, a percentage by intent:
            "did you mean 40%?"), a string that does not parse, or a budget that is not
            positive.

    Example:
        >>> check_budget_value("0.5", "remat.autoplan: budget")
        Traceback (most recent call last):
        ValueError: remat.autoplan: budget 0.5: 0.5 bytes fit no model; did you mean 50%?
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(
            f"{who} must be bytes (an int), a size such as '6GiB' or a percentage such as "
            f"'40%', got {type(budget).__name__} {budget!r}"
        )
    meant = percent_meant(budget)
    if meant is not None:
        raise ValueError(f"{who} {budget}: {budget} bytes fit no model; did you mean {meant}?")
    # Any baseline a real step has is below 2**60 bytes: a percentage that is 0 bytes of it
    # is 0 bytes of every baseline.
    parse_budget(budget, baseline_bytes=2**60, name=who)


def parse_budget(
    budget: int | float | str, *, baseline_bytes: int | None = None, name: str = "budget"
) -> int:
    """A memory budget in bytes.

    Args:
        budget: bytes as a number (``123456``), a size with a unit (``"6GiB"``, ``"512MB"``,
            ``"1.5 GB"``; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024,
            case-insensitive), or a percentage of ``baseline_bytes`` (``"40%"``).
        baseline_bytes: the un-checkpointed activation memory that percentages refer to.
        name: how the messages name the budget (``"remat.autoplan: budget"``, ``"--budget"``).

    Returns:
        The budget in whole bytes (rounded down), always positive.

    Raises:
        TypeError: ``budget`` is neither a number nor a string.
        ValueError: the string does not parse, the budget is not positive, or a percentage
            is given without ``baseline_bytes``.

    Example:
        >>> parse_budget("6GiB")
        6442450944
        >>> parse_budget("40%", baseline_bytes=1000)
        400
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(
            f"{name} must be bytes (int) or a string like '6GiB' or '40%', got {budget!r}"
        )
    if isinstance(budget, (int, float)):
        if not math.isfinite(budget) or budget < 1:
            raise ValueError(f"{name} must be a positive number of bytes, got {budget!r}")
        return int(budget)
    m = _PATTERN.match(budget)
    if m is None:
        raise ValueError(
            f"{name} {budget!r} does not parse: expected e.g. '6GiB', '512MB', '123456' or '40%'"
        )
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):
        raise ValueError(f"{name} {budget!r} is not a finite number")
    if unit == "%":
        if baseline_bytes is None:
            raise ValueError(f"{name} {budget!r} is a percentage but no baseline_bytes was given")
        if isinstance(baseline_bytes, bool) or not isinstance(baseline_bytes, int):
            raise TypeError(f"baseline_bytes must be an int, got {baseline_bytes!r}")
        out = int(baseline_bytes * value / 100)
    elif unit in _UNITS:
        if not math.isfinite(value * _UNITS[unit]):
            raise ValueError(f"{name} {budget!r} is not a finite number of bytes")
        out = int(value * _UNITS[unit])
    else:
        valid = ", ".join(u for u in _UNITS if u) + ", %"
        raise ValueError(f"{name} {budget!r}: unknown unit {m.group(2)!r}; use one of {valid}")
    if out < 1:
        raise ValueError(f"{name} {budget!r} is {out} bytes; it must be at least 1 byte")
    return out
