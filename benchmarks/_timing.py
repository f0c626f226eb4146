"""Interleaved timing for the benchmark scripts: every model takes one step per round, in an
order that rotates each round, so that slow phases of a noisy machine hit all of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def step_seconds(workload: Any, *, free_gradients: bool = False) -> float:
    """One timed training step (forward and backward) of a ``remat.bench.workloads.Workload``,
    synchronised on CUDA.

    ``free_gradients`` drops the gradients after the step, for scripts that keep many large
    models in one process (their gradients would otherwise stay between turns).
    """
    import torch

    sync = torch.cuda.synchronize if workload.inputs[0].is_cuda else (lambda: None)
    workload.model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    workload.loss().backward()
    sync()
    seconds = time.perf_counter() - start
    if free_gradients:
        workload.model.zero_grad(set_to_none=True)
    return seconds


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
