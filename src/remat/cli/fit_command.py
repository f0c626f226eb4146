"""``remat fit``: the largest batch (or, with ``--seq-len auto``, sequence length) whose
training step fits a device, with the cheapest plan, beside no, full and selective
checkpointing at each size profiled."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import remat
from remat.bench.model_choice import (
    DTYPES,
    build_bench_workload,
    check_model,
    check_model_options,
    effective_sizes,
)
from remat.bench.runner import resolve_device
from remat.bench.user_models import parse_model_args
from remat.cli.common import error, output_path_error, sizes_given
from remat.planner.device_budget import parse_headroom
from remat.planner.fitting import FitResult
from remat.planner.training_state import OPTIMIZER_STATE_BYTES
from remat.solver.budget import looks_like_percent, parse_budget
from remat.targets.devices import get_target

__all__ = ["run_fit_command"]

_BAD_INPUT = (ValueError, TypeError, RuntimeError, remat.PlanError)


def run_fit_command(args: argparse.Namespace) -> int:
    try:
        options = _check(args)
    except (ValueError, TypeError) as e:
        return error(str(e), "fit")
    try:
        result = remat.fit(
            _builder(args, options),
            target=options["target"],
            device_bytes=options["memory"],
            optimizer=args.optimizer,
            world_size=args.world_size,
            headroom=options["headroom"],
            batch=(args.batch or 1) if options["auto"] else args.batch,
            seq_len=None if options["auto"] else options["seq_len"],
            progress=lambda line: print(f"  {line}", file=sys.stderr),
        )
    except _BAD_INPUT as e:
        print(f"remat fit: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_report(result), f, indent=2)
    if args.plot:
        _plot(result, args.plot)
    return 0 if result.best is not None else 1


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checked before the first profile."""
    check_model(args.model)
    model_args = parse_model_args(args.model_args)
    sizes = sizes_given(args)
    sizes.pop("seq_len", None)  # a string here: checked below
    auto = args.seq_len == "auto"
    seq_len = None
    if args.seq_len is not None and not auto:
        try:
            seq_len = int(args.seq_len)
        except ValueError:
            raise ValueError(f"--seq-len {args.seq_len}: a positive integer or auto") from None
        if seq_len < 1:
            raise ValueError(f"--seq-len {args.seq_len}: a positive integer or auto")
        sizes["seq_len"] = seq_len
    check_model_options(args.model, batch=args.batch, sizes=sizes, model_args=model_args)
    has_seq = "seq_len" in effective_sizes(args.model, sizes)
    if auto and not has_seq:
        raise ValueError(f"--seq-len auto: {args.model} takes no sequence length (gpt, hf:<arch>)")
    if has_seq and seq_len is None and not auto:
        seq_len = effective_sizes(args.model, sizes)["seq_len"]
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be a positive integer")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype}: valid dtypes are {', '.join(DTYPES)}")
    if args.optimizer not in OPTIMIZER_STATE_BYTES:
        known = ", ".join(OPTIMIZER_STATE_BYTES)
        raise ValueError(f"--optimizer {args.optimizer}: known optimizers are {known}")
    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size}: a positive count")
    target = None if args.target is None else get_target(args.target)
    device = args.device or ("meta" if target is not None else "cpu")
    device = "meta" if device == "meta" else resolve_device(device)
    if device == "meta" and target is None:
        raise ValueError("--device meta predicts for a GPU: give --target (h100, a100, ...)")
    if args.budget is None and target is None:
        raise ValueError("--budget: the memory per rank (80GB), or --target to take its memory")
    memory = _device_memory(args.budget) if args.budget else target.memory_bytes  # type: ignore[union-attr]
    headroom = None if args.headroom is None else parse_headroom(args.headroom, memory)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        problem = output_path_error(flag, path)
        if problem is not None:
            raise ValueError(problem)
    return {
        "model_args": model_args, "sizes": sizes, "seq_len": seq_len, "auto": auto,
        "target": target, "device": device, "memory": memory, "headroom": headroom,
    }  # fmt: skip


def _device_memory(text: str) -> int:
    """``--budget``: the memory per rank, as a size."""
    if text.strip().endswith("%") or looks_like_percent(text):
        raise ValueError(f"--budget {text}: the memory per rank as a size (80GB, 24GiB)")
    return parse_budget(text, name="--budget")


def _builder(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    def build(batch: int, seq_len: int | None) -> tuple[Any, ...]:
        sizes = dict(options["sizes"])
        if seq_len is not None:
            sizes["seq_len"] = seq_len
        w = build_bench_workload(
            args.model, batch=batch, device=str(options["device"]), dtype=args.dtype,
            seed=args.seed, sizes=sizes, model_args=options["model_args"],
        )  # fmt: skip
        return w.model, w.inputs, w.kwargs, w.loss_of

    return build


def _report(result: FitResult) -> dict[str, Any]:
    return {
        "best": None if result.best is None else dataclasses.asdict(result.best),
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "searched": result.searched,
        "device_bytes": result.device_bytes,
        "headroom_bytes": result.headroom_bytes,
        "world_size": result.world_size,
    }


def _plot(result: FitResult, path: str) -> None:
    """Peak per rank against the searched size, a line per plan, the device's usable
    memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of = (lambda r: r.seq_len) if result.searched == "seq_len" else (lambda r: r.batch)
    unit, size = ("GB", 1e9) if result.device_bytes >= 1e9 else ("MB", 1e6)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in ("none", "full", "selective", "remat"):
        points = sorted(
            (x_of(r), r.peak_bytes / size)
            for r in result.rows
            if r.plan == name and r.peak_bytes is not None
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    usable = (result.device_bytes - result.headroom_bytes) / size
    ax.axhline(usable, color="black", linestyle="--", label=f"usable {usable:.1f} {unit}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length" if result.searched == "seq_len" else "batch size")
    ax.set_ylabel(f"predicted peak per rank ({unit})")
    ax.legend()
    ax.set_title("remat fit: peak memory per plan")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
