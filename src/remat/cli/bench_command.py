"""``remat bench``: each checkpointing configuration of a model in its own process, side
by side (the work is in ``remat.bench``; this parses, runs and prints)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from remat.bench.plots import plot_bench
from remat.bench.runner import BenchOptions, check_options, parse_configs, run_bench
from remat.bench.table import print_table
from remat.bench.user_models import parse_model_args
from remat.cli.common import error, output_path_error, sizes_given
from remat.cli.help_texts import SIZE_FLAGS
from remat.errors import MissingExtraError

__all__ = ["run_bench_command"]


def run_bench_command(args: argparse.Namespace) -> int:

    sizes = sizes_given(args)
    if sizes and not (args.model == "gpt" or args.model.startswith("hf:")):
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in SIZE_FLAGS if getattr(args, f))
        return error(f"{flags}: size flags apply to --model gpt or hf:<arch>, not {args.model!r}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if (problem := output_path_error(flag, path)) is not None:
            return error(problem)
    try:
        options = BenchOptions(
            model_args=parse_model_args(args.model_args),
            model=args.model,
            configs=parse_configs(args.configs),
            batch=args.batch,
            device=args.device,
            dtype=args.dtype,
            steps=args.steps,
            warmup=args.warmup,
            sizes=sizes,
            seed=args.seed,
        )
        check_options(options)  # before the progress bar and any worker
        result = run_bench(options) if args.quiet else _run_with_progress(run_bench, options)
    except (ValueError, RuntimeError, MissingExtraError) as e:
        return error(str(e))

    if args.json:
        result.write_json(args.json)
    if args.plot:
        plot_bench(result, args.plot)
    if not args.quiet:
        print_table(result)
    for row in result.configs:
        if row.status in ("FAIL", "crashed"):
            print(f"remat bench: {row.name}: {row.status}: {row.error}", file=sys.stderr)
    return 1 if result.failed else 0


def _run_with_progress(run_bench: Any, options: Any) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting workers", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        return run_bench(options, progress=progress)
