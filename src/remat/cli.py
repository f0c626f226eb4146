"""The ``remat`` command. Thin: argument parsing and printing; the work is in ``remat.bench``.

rich and matplotlib are imported inside the functions that use them, so ``import remat``
stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
from typing import Any

import torch

import remat
from remat.bench.configurations import check_budget, offload_store_for
from remat.bench.model_choice import (
    DTYPES,
    build_bench_workload,
    check_model,
    check_model_options,
)
from remat.bench.plots import plot_bench
from remat.bench.runner import (
    CONFIGS,
    BenchOptions,
    check_options,
    parse_configs,
    resolve_device,
    run_bench,
)
from remat.bench.table import print_table
from remat.bench.user_models import parse_model_args
from remat.errors import MissingExtraError
from remat.measure.storage import unique_storage_bytes
from remat.planner.sharding import shard_profile, sharded_state
from remat.planner.training_state import OPTIMIZER_STATE_BYTES, training_state
from remat.profiling.step import measure_step_peak
from remat.solver.budget import looks_like_percent, parse_budget
from remat.targets.devices import describe_targets, get_target

__all__ = ["main"]

DESCRIPTION = "remat: activation checkpointing for PyTorch, measured."

MAIN_EPILOG = """\
examples:
  remat bench                                    the tutorial's MLP, every configuration
  remat bench --model gpt --layers 6             a GPT-style stack
  remat bench --json out/bench.json --plot out/bench.png
  remat bench --help                             all options of the benchmark
  remat plan --model gpt --budget 40% --verify   the cheapest plan for a budget, checked
"""

BENCH_EPILOG = """\
configurations (--configs, comma-separated; none always runs, as the reference):
{configs}

examples:
  remat bench
  remat bench --configs remat,all-blocks --steps 10
  remat bench --model gpt --layers 4 --d-model 128 --seq-len 128 --batch 4
  remat bench --model hf:gpt2 --json gpt2.json --plot gpt2.png
  remat bench --model convnet --device cuda --dtype bfloat16
  remat bench --configs tutorial-reentrant      shows the reentrant bug: exits 1
  remat bench --model examples/08_my_model.py:build --model-arg layers=6
  remat bench --model hf:./config.json --model-arg num_key_value_heads=2 --configs remat
  remat bench --model examples/08_my_model.py:build --configs remat,plan:plan.json

exit status: 0 when every configuration matches none's loss and gradients (a configuration
that runs out of memory, or an auto:<budget> no plan meets, is a result, not a failure); 1
when one differs (FAIL) or its worker crashed, naming it; 2 for bad arguments.
"""

PLAN_EPILOG = """\
examples:
  remat plan --model gpt --budget 40%
  remat plan --model gpt --layers 48 --budget 2GiB --json plan.json
  remat plan --model gpt --budget 45% --solver sqrt --verify
  remat plan --model examples/08_my_model.py:build --budget 50% --verify --json plan.json
  remat plan --model gpt --layers 24 --device meta --target h100 --budget 40%
  remat plan --model gpt --dtype bfloat16 --device meta --target l4 --optimizer adamw --budget 1GB
  remat plan --target list

exit status: 0 when a plan fits (and, with --verify, its measured peak fits and its gradients
equal the un-checkpointed model's); 1 when no plan fits or the check fails; 2 for bad
arguments.
"""

MODEL_HELP = (
    "{default}; also mlp, gpt, convnet; hf:<arch> (a transformers model type: hf:gpt2, "
    "hf:llama) or hf:./config.json; your own: path/to/file.py:factory or "
    "package.module:factory, where factory(**model_args) returns (model, inputs[, loss_fn])"
)

SIZE_FLAGS = {  # flag -> size option of GPTConfig (and of hf:<arch> models)
    "layers": "n_layers",
    "d_model": "d_model",
    "heads": "n_heads",
    "seq_len": "seq_len",
    "vocab": "vocab_size",
}
SIZE_HELP = {  # defaults: GPTConfig's, then remat.bench.hf_workloads.HF_DEFAULT_SIZES
    "layers": "blocks (gpt 12, hf 4)",
    "d_model": "width (gpt 256, hf 256)",
    "heads": "attention heads (gpt 8, hf 4)",
    "seq_len": "sequence length (gpt 256, hf 256)",
    "vocab": "vocabulary size (gpt 1024, hf 2048)",
}


def _parser() -> argparse.ArgumentParser:

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
    _add_size_flags(bench)
    bench.add_argument("--json", metavar="PATH", help="write every figure and the environment")
    bench.add_argument("--plot", metavar="PATH", help="write the two-panel PNG")
    bench.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    bench.set_defaults(run=_bench)

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
    plan.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, ...")
    plan.add_argument("--seed", type=int, default=0, help="seeds weights and data")
    _add_size_flags(plan)
    plan.add_argument("--json", metavar="PATH", help="write the plan (and the check) as JSON")
    plan.set_defaults(run=_plan)
    return parser


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-arg",
        dest="model_args",
        action="append",
        metavar="KEY=VALUE",
        help="repeatable: an option of your factory (layers=4), or a config field of an "
        "hf:<arch> model (num_key_value_heads=2); values are Python literals or strings",
    )
    sizes = parser.add_argument_group("model sizes (gpt and hf:<arch>)")
    for flag in SIZE_FLAGS:
        sizes.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=int, metavar="N", help=SIZE_HELP[flag]
        )


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """The model size options given on the command line (``--layers`` -> ``n_layers``)."""
    sizes = {opt: getattr(args, flag) for flag, opt in SIZE_FLAGS.items()}
    return {k: v for k, v in sizes.items() if v is not None}


def _version() -> str:

    return getattr(remat, "__version__", "unknown")


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that cleanups run (workers, temp folders)."""


def main(argv: list[str] | None = None) -> int:
    """Run ``remat`` with ``argv`` (``sys.argv[1:]`` when ``None``) and return the exit status.

    Ctrl-C and SIGTERM end it with one line on stderr (exit 130 and 143), its workers and
    temporary folders removed.

    Example:
        >>> main(["bench", "--batch", "64", "--quiet", "--json", "bench.json"])  # doctest: +SKIP
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse's own status
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"remat {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"remat {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str, command: str = "bench") -> int:
    print(f"remat {command}: error: {message}", file=sys.stderr)
    return 2


def _output_path_error(flag: str, path: str | None) -> str | None:
    """Why ``path`` cannot be written (checked before minutes of work), or ``None``."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory; give a file name"
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its directory ({e.strerror})"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{flag} {path}: not writable"
    return None


def _bench(args: argparse.Namespace) -> int:

    sizes = _sizes(args)
    if sizes and not (args.model == "gpt" or args.model.startswith("hf:")):
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in SIZE_FLAGS if getattr(args, f))
        return _error(f"{flags}: size flags apply to --model gpt or hf:<arch>, not {args.model!r}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if (problem := _output_path_error(flag, path)) is not None:
            return _error(problem)
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
        return _error(str(e))

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


def _plan(args: argparse.Namespace) -> int:

    if args.target == "list":
        print(describe_targets())
        return 0
    sizes = _sizes(args)
    try:  # everything that can be checked before the profile's minutes
        check_model(args.model)
        model_args = parse_model_args(args.model_args)
        check_model_options(args.model, batch=args.batch, sizes=sizes, model_args=model_args)
        check_budget(args.budget, "--budget")
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype {args.dtype}: valid dtypes are {', '.join(DTYPES)}")
        if args.solver not in ("auto", "chain", "sqrt", "every-n", "greedy"):
            raise ValueError(
                f"--solver {args.solver}: valid solvers are auto, chain, sqrt, every-n, greedy"
            )
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch {args.batch}: must be a positive integer")
        problem = _output_path_error("--json", args.json)
        if problem is not None:
            raise ValueError(problem)
        device = "meta" if args.device == "meta" else resolve_device(args.device)
        if device == "meta" and args.verify:
            raise ValueError("--verify runs the model: it needs --device cpu or cuda, not meta")
        target = None if args.target is None else get_target(args.target)
        if args.optimizer is not None:
            if args.optimizer not in OPTIMIZER_STATE_BYTES:
                known = ", ".join(OPTIMIZER_STATE_BYTES)
                raise ValueError(f"--optimizer {args.optimizer}: known optimizers are {known}")
            if looks_like_percent(args.budget) or args.budget.strip().endswith("%"):
                raise ValueError(
                    f"--budget {args.budget} with --optimizer: give the device's memory in "
                    "bytes (80GiB), which parameters, optimizer state and activations share"
                )
        if args.world_size < 1 or (args.world_size > 1 and args.optimizer is None):
            raise ValueError(f"--world-size {args.world_size}: a positive count, with --optimizer")
    except (ValueError, TypeError, RuntimeError, MissingExtraError) as e:
        return _error(str(e), "plan")

    def build() -> Any:
        return build_bench_workload(
            args.model,
            batch=args.batch,
            device=device,
            dtype=args.dtype,
            seed=args.seed,
            sizes=sizes,
            model_args=model_args,
        )

    try:
        workload = build()
        loss_fn = workload.loss_of
        prof = remat.profile(
            workload.model,
            *workload.inputs,
            loss_fn=loss_fn,
            target_device=target,
            **workload.kwargs,
        )
        prof = shard_profile(prof, workload.model, args.world_size)
        budget, resident = args.budget, None
        if args.optimizer is not None:  # the step's new bytes get what the state leaves
            resident = training_state(workload.model, args.optimizer)
            if args.world_size > 1:
                regions = [r.name for r in prof.regions]
                resident = sharded_state(resident, workload.model, regions, args.world_size)
            inputs = unique_storage_bytes(workload.tensors)
            left = parse_budget(args.budget) - resident.total - inputs
            print(resident.describe(inputs, left))
            if left < 1:
                raise remat.BudgetError(
                    f"--budget {args.budget}: the parameters, optimizer state and inputs alone "
                    f"take {(resident.total + inputs) / 1e6:.2f} MB"
                )
            budget = left
        chosen = remat.plan(prof, budget, solver=args.solver)
    except remat.BudgetError as e:
        print(f"remat plan: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, MissingExtraError) as e:
        print(f"remat plan: error: {e}", file=sys.stderr)
        return 2
    print(chosen)
    print(
        f"un-checkpointed step peak {prof.step_peak_bytes / 1e6:.2f} MB; planned peak "
        f"{chosen.predicted_peak_bytes / 1e6:.2f} MB (the head and loss add "
        f"{prof.tail_bytes / 1e6:.2f} MB after the blocks; {prof.outside_bytes / 1e6:.2f} MB "
        "live beside them: what ran before, shared inputs)"
    )
    if resident is not None:
        whole = chosen.predicted_peak_bytes + resident.total + inputs
        print(
            f"predicted peak per {'rank' if args.world_size > 1 else 'device'} "
            f"{whole / 1e6:.2f} MB: the plan's "
            f"{chosen.predicted_peak_bytes / 1e6:.2f} MB on top of "
            f"{(resident.total + inputs) / 1e6:.2f} MB of parameters, optimizer state and inputs"
        )
    if target is not None:
        # The backward taken as twice the forward: a matmul's backward is two matmuls.
        plain = 3 * chosen.forward_cost
        print(
            f"predicted step time on {target.name} {(plain + chosen.extra_cost) * 1e3:.3g} ms "
            f"(the blocks' forward, twice that for the backward, and the recomputation): "
            f"{chosen.extra_cost / plain if plain else 0:.1%} over no checkpointing"
        )
    report: dict[str, Any] = {"plan": chosen.to_dict(), "step_peak_bytes": prof.step_peak_bytes}
    status = 0
    if args.verify:
        reference = build()
        torch.manual_seed(args.seed)
        reference.loss().backward()
        remat.apply_plan(workload.model, chosen, offload_store=offload_store_for(workload.device))
        measured = measure_step_peak(workload.model, workload.inputs, loss_fn, **workload.kwargs)
        torch.manual_seed(args.seed)
        workload.loss().backward()
        diff = max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(workload.model.parameters(), reference.model.parameters())
            if a.grad is not None
        )
        try:  # bitwise on CPU float32 in practice; assert_close's tolerances elsewhere
            torch.testing.assert_close(
                [a.grad for a in workload.model.parameters()],
                [b.grad for b in reference.model.parameters()],
            )
            same = True
        except AssertionError:
            same = False
        fits = measured <= chosen.budget_bytes
        print(
            f"measured peak {measured / 1e6:.2f} MB ({'within' if fits else 'OVER'} the budget "
            f"{chosen.budget_bytes / 1e6:.2f} MB; predicted {chosen.predicted_peak_bytes / 1e6:.2f}"
            f" MB); max |gradient difference| {diff:.1e}"
        )
        report["verify"] = {"measured_peak_bytes": measured, "max_grad_diff": diff}
        status = 0 if fits and same else 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return status


def _run_with_progress(run_bench: Any, options: Any) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting workers", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        return run_bench(options, progress=progress)


if __name__ == "__main__":
    sys.exit(main())
