"""Figures as remat prints them: one unit family, powers of ten (1 MB = 10^6 B, as
``nvidia-smi`` and the GPU datasheets count), no scientific notation."""

from __future__ import annotations

import math

__all__ = ["fmt_bytes", "fmt_flops", "fmt_seconds", "fmt_small"]


def fmt_bytes(n: float, *, round_up: bool = False) -> str:
    """``1_650_000_000`` -> ``"1.65 GB"``; kB, MB, GB or TB by size, two decimals
    (``round_up``: never below ``n``, for a least budget)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            value = math.ceil(n / size * 100) / 100 if round_up else n / size
            return f"{value:.2f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


def fmt_seconds(s: float) -> str:
    """``0.761`` -> ``"761 ms"``, ``1.5`` -> ``"1.50 s"``, ``2e-5`` -> ``"20 µs"``: three
    significant digits at most, in s, ms or µs."""
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if abs(s) >= size:
            return f"{_three_digits(s / size)} {unit}"
    return f"{_three_digits(s / 1e-6)} µs" if s else "0 ms"


def fmt_flops(n: float) -> str:
    """``1.5e14`` -> ``"150 TFLOP"``: a prefix that leaves at most three digits before the point."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{_three_digits(n / size)} {prefix}FLOP"
    return f"{int(n)} FLOP"


def _three_digits(x: float) -> str:
    """At most three significant digits, never in exponent form (``x`` below 10^6)."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_small(x: float) -> str:
    """A small difference: ``1.19e-07`` -> ``"1.2x10^-7"``, ``0.0`` -> ``"0"``, ``0.05`` ->
    ``"0.0500"``."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    exponent = math.floor(math.log10(abs(x)))
    return f"{x / 10**exponent:.1f}x10^{exponent}" if exponent < -2 else f"{x:.4f}"
