"""The ``remat`` command line: one parser, a subparser per command."""

from __future__ import annotations

import argparse
import textwrap

import remat
from remat.bench.runner import CONFIGS
from remat.cli.bench_command import run_bench_command
from remat.cli.common import add_size_flags
from remat.cli.fit_command import run_fit_command
from remat.cli.help_texts import (
    BENCH_EPILOG,
    DESCRIPTION,
    FIT_EPILOG,
    HEADROOM_DEFAULT,
    MAIN_EPILOG,
    MODEL_HELP,
    PLAN_EPILOG,
)
from remat.cli.plan_command import run_plan_command

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:

    listed = "\n".join(
        textwrap.fill(
            c.description + ("" if c.default else " [not default]"),
            width=96,
            initial_indent=f"  {c.name + (':<arg>' if c.takes_arg else ''):<20} ",
            subsequent_indent=" " * 23,
        )
        for c in CONFIGS.values()
        if not c.hidden
    )
    parser = argparse.ArgumentParser(
        prog="remat",
        description=DESCRIPTION,
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bench(sub, listed)

    _add_plan(sub)
    _add_fit(sub)
    return parser


def _version() -> str:

    return getattr(remat, "__version__", "unknown")


def _add_bench(sub: argparse._SubParsersAction, listed: str) -> None:
    bench = sub.add_parser(
        "bench",
        help="memory, time and FLOPs of checkpointing configurations, side by side",
        description="Run a training step (forward + backward) of a model under each checkpointing\n"
        "configuration, each in its own process. Report memory peaks and bytes\n"
        "kept for backward (remat's tracker; the CUDA allocator's figures too on a GPU),\n"
        "median step time over interleaved rounds after a warm-up, extra FLOPs from\n"
        "recomputation, and whether loss and gradients equal none's.",
        epilog=BENCH_EPILOG.format(configs=listed),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", default="mlp", help=MODEL_HELP.format(default="default mlp"))
    bench.add_argument("--configs", help="comma-separated configurations (default: the set above)")
    bench.add_argument("--batch", type=int, help="batch size (default: the model's)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument(
        "--dtype", default="float32", help="float32 (default), bfloat16, float16, float64"
    )
    bench.add_argument("--steps", type=int, default=5, help="timed rounds (default 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    bench.add_argument("--seed", type=int, default=0, help="seeds weights, data and dropout")
    add_size_flags(bench)
    bench.add_argument("--json", metavar="PATH", help="write every figure and the environment")
    bench.add_argument("--plot", metavar="PATH", help="write the two-panel PNG")
    bench.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    bench.set_defaults(run=run_bench_command)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="the cheapest checkpointing plan for a memory budget",
        description="Profile a model (per block: time, bytes, ops), plan for the budget with\n"
        "remat's optimal chain solver (or a heuristic), print the plan and its prediction;\n"
        "with --verify, apply it, measure the training step's peak with the tracker and\n"
        "compare gradients with the un-checkpointed model.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--model", default="gpt", help=MODEL_HELP.format(default="default gpt"))
    plan.add_argument(
        "--budget",
        help="required: bytes, a size (300MB, 6GiB) or a percentage of the un-checkpointed "
        "step's peak",
    )
    plan.add_argument(
        "--solver", default="auto", help="auto (optimal chain DP), sqrt, every-n, greedy"
    )
    plan.add_argument("--verify", action="store_true", help="apply, measure, check gradients")
    plan.add_argument(
        "--compile",
        action="store_true",
        help="plan for training under torch.compile: each plan measured compiled until its "
        "peak fits (a percentage is of the compiled peak); needs cpu or cuda",
    )
    plan.add_argument("--batch", type=int, help="batch size (default: the model's)")
    plan.add_argument(
        "--device",
        help="cpu, cuda or meta (no memory used; with --target) (default: cuda when available)",
    )
    plan.add_argument(
        "--target",
        help="the device to plan for: h100, h200, a100, l4, rtx4090, cpu (measured here); "
        "costs become its predicted seconds; 'list' prints the targets",
    )
    plan.add_argument(
        "--optimizer",
        help="adamw, adam, sgd-momentum, sgd: count the parameters, optimizer state and (bf16/"
        "fp16) fp32 master weights in the budget, which is then the device's whole memory",
    )
    plan.add_argument(
        "--world-size", type=int, default=1, help="plan one rank of FSDP2 over N ranks "
        "(with --optimizer): state and gradients sharded, two regions gathered in flight",
    )  # fmt: skip
    plan.add_argument(
        "--headroom",
        help="with --optimizer: memory kept free of the budget, a size (2GB) or a percentage of "
        f"it ({HEADROOM_DEFAULT})",
    )
    plan.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, ...")
    plan.add_argument("--seed", type=int, default=0, help="seeds weights and data")
    add_size_flags(plan)
    plan.add_argument("--json", metavar="PATH", help="write the plan (and the check) as JSON")
    plan.add_argument(
        "--verbose", action="store_true", help="one row per region, with the ops each keeps"
    )
    plan.set_defaults(run=run_plan_command)


def _add_fit(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser(
        "fit",
        help="the largest batch (or sequence) that fits a device, and the plan for it",
        description="Profile the model at growing batch sizes (or sequence lengths, with\n"
        "--seq-len auto) for a device, the training state and a headroom taken off its\n"
        "memory, and print none / full / selective checkpointing and remat's plan at each:\n"
        "predicted peak per rank, whether it fits, step time and tokens per second.",
        epilog=FIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--model", default="gpt", help=MODEL_HELP.format(default="default gpt"))
    fit.add_argument(
        "--target",
        help="the device to fit: h100, h200, a100, l4, rtx4090, cpu (measured here); profiled "
        "on meta, nothing allocated",
    )
    fit.add_argument(
        "--budget", help="memory per rank, a size (80GB) (default: the target's memory)"
    )
    fit.add_argument(
        "--headroom",
        help=f"memory kept free: a size or a percentage of --budget ({HEADROOM_DEFAULT})",
    )
    fit.add_argument(
        "--optimizer", default="adamw", help="adamw (default), adam, sgd-momentum, sgd"
    )
    fit.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks (default 1)")
    fit.add_argument("--batch", type=int, help="fix the batch size (searched when not given)")
    fit.add_argument(
        "--device", help="meta (default with --target) or cpu (measured: default without)"
    )
    fit.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, ...")
    fit.add_argument("--seed", type=int, default=0, help="seeds weights and data")
    add_size_flags(fit, seq_len_auto=True)
    fit.add_argument("--json", metavar="PATH", help="write every row as JSON")
    fit.add_argument("--plot", metavar="PATH", help="write a PNG of peak per rank per plan")
    fit.set_defaults(run=run_fit_command)
