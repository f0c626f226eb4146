"""Interleaved timing for the benchmark scripts: every model takes one step per round, in an
order that rotates each round, so that slow phases of a noisy machine hit all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def interleaved_seconds(
    workloads: dict[str, Any], rounds: int, warmup: int, step: Callable[[Any], float]
) -> dict[str, list[float]]:
    """``step(workload)`` seconds per round for each workload, after ``warmup`` rounds."""
    for _ in range(warmup):
        for w in workloads.values():
            step(w)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    names = list(workloads)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(step(workloads[name]))
    return times
