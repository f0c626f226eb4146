"""What to change when ``remat plan`` finds no plan within ``--budget``: more FSDP ranks,
a shorter sequence, a smaller batch. Each change is checked (planned for, not guessed):
more ranks reshard the profile already made; a smaller size is profiled again."""

from __future__ import annotations

import argparse
from typing import Any

import remat
from remat.bench.model_choice import build_bench_workload, effective_sizes
from remat.planner.device_budget import DeviceBudget, Headroom, default_headroom, parse_headroom
from remat.planner.fitting import device_budget_for, least_step_peak
from remat.planner.sharding import shard_profile
from remat.solver.units import fmt_bytes

__all__ = ["build_and_profile", "cheaper_changes", "headroom_for"]

_MAX_RANKS = 4096
_HALVINGS = 2  # profiles of smaller sizes tried per flag


def cheaper_changes(
    args: argparse.Namespace, checked: Any, workload: Any, whole: Any, budget: DeviceBudget
) -> str:
    """The changes that make a plan fit, in flag form (``--world-size 16 (76.2 GB per
    rank), or --seq-len 4096 (...)``), or ``""``; ``whole``: the unsharded profile."""
    found = [_more_ranks(args, checked, workload, whole, budget)]
    sizes = effective_sizes(args.model, checked.sizes)
    if "seq_len" in sizes:
        found.append(_smaller(args, checked, budget, "seq_len", sizes["seq_len"]))
    if args.batch is not None:
        found.append(_smaller(args, checked, budget, "batch", args.batch))
    return ", or ".join(f for f in found if f)


def _more_ranks(
    args: argparse.Namespace, checked: Any, workload: Any, whole: Any, budget: DeviceBudget
) -> str:
    n = args.world_size * 2
    while n <= _MAX_RANKS:
        prof = shard_profile(whole, workload.model, n)
        ranked = device_budget_for(
            workload.model, workload.tensors, prof, args.optimizer, n, budget.device_bytes,
            headroom=headroom_for(args, checked, budget.device_bytes, n),
        )  # fmt: skip
        least = least_step_peak(prof)
        if least <= ranked.step_bytes:
            return f"--world-size {n} ({fmt_bytes(ranked.total_for(least))} per rank)"
        n *= 2
    return ""


def _smaller(
    args: argparse.Namespace, checked: Any, budget: DeviceBudget, flag: str, size: int
) -> str:
    for _ in range(_HALVINGS):
        size //= 2
        if size < 1:
            return ""
        sizes = {**checked.sizes, flag: size} if flag == "seq_len" else checked.sizes
        batch = size if flag == "batch" else args.batch
        workload, whole = build_and_profile(args, checked, batch=batch, sizes=sizes)
        prof = shard_profile(whole, workload.model, args.world_size)
        sized = device_budget_for(
            workload.model, workload.tensors, prof, args.optimizer, args.world_size,
            budget.device_bytes, headroom=budget.headroom,
        )  # fmt: skip
        least = least_step_peak(prof)
        if least <= sized.step_bytes:
            name = flag.replace("_", "-")
            return f"--{name} {size} ({fmt_bytes(sized.total_for(least))} per {sized.ranks})"
    return ""


def build_and_profile(
    args: argparse.Namespace, checked: Any, *, batch: int | None, sizes: dict[str, int]
) -> tuple[Any, Any]:
    """The workload ``--model`` names at ``batch`` and ``sizes``, and its profile (for
    ``--target`` when given), unsharded."""
    workload = build_bench_workload(
        args.model, batch=batch, device=checked.device, dtype=args.dtype, seed=args.seed,
        sizes=sizes, model_args=checked.model_args,
    )  # fmt: skip
    whole = remat.profile(
        workload.model,
        *workload.inputs,
        loss_fn=workload.loss_of,
        target_device=checked.target,
        **workload.kwargs,
    )
    return workload, whole


def headroom_for(args: argparse.Namespace, checked: Any, device_bytes: int, ranks: int) -> Headroom:
    """``--headroom``, or the default for the device planned for over ``ranks`` ranks."""
    if args.headroom is not None:
        return parse_headroom(args.headroom, device_bytes)
    return default_headroom(checked.target, str(checked.device), ranks)
