"""remat's planner against the usual ways of choosing what to checkpoint, at equal measured peak.

For a GPT-style model (12 blocks by default, d=256, 8 heads, seq 256, batch 8, float32, CPU)
and a heterogeneous chain of residual MLP blocks (widths 1x, 8x, 2x, 4x of d, repeating),
this measures, for each method, the training step's peak (new bytes, parameters and inputs
excluded, by remat's tracker) and the step time as a ratio to no checkpointing (median of
interleaved rounds in this process):

- ``all-blocks``, ``every-2/3/4``: per-block recomputation of every n-th block;
- ``sqrt``: Chen's √n segments (``remat.sqrt()``);
- ``torch-selective``: PyTorch's selective checkpointing on every block, saving
  mm/addmm/sdpa outputs (``torch.utils.checkpoint`` + ``create_selective_checkpoint_contexts``);
- ``remat:<budget>``: ``remat.autoplan`` at budgets from 75% down to 20% of none's peak;
- ``remat@<method>``: ``remat.autoplan`` with the budget set to that method's measured peak,
  the head-to-head comparison at equal peak (``--no-match`` skips them).

``--compile`` compares compiled training instead (``_compile_side_by_side.py``): for each of
``--compile-models``, ``torch.compile`` with ``activation_memory_budget`` in
``--compile-budgets`` against ``remat.autoplan(..., compile=True)`` at the peak each budget
measures, and at 25/50/75% of the compiled peak; peaks from the allocators' events
(``remat.AllocationTracker``), times the median of per-round ratios to the compiled model
without recomputation over ``--rounds`` interleaved rounds. It writes ``--compile-json``.

``sac_milp:<fraction>`` is PyTorch's own planner (``torch.distributed._tools``: SAC estimator +
``sac_milp``), run on CPU through ``_sac_milp.py`` (its op timer uses CUDA events; that file
supplies CPU stand-ins, see its docstring), applied as PyTorch selective checkpointing. It
needs ``pulp`` and ``pwlf`` (``pip install -e ".[bench]"``); without them its rows are skipped
and the JSON says so.

Prints a table, writes JSON and a frontier plot (peak vs time ratio, one series per method).

Run: ``python benchmarks/planner.py [--layers 12 48] [--budgets 75,60,50,40,30,25,20]``
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved_seconds, step_seconds
from torch import nn

import remat
from remat.bench.workloads import Workload, build_workload
from remat.profiling.step import measure_step_peak

RESULTS = Path(__file__).parent / "results"


class HeteroBlock(nn.Module):
    def __init__(self, d: int, mult: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mult * d)
        self.fc2 = nn.Linear(mult * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class HeteroChain(nn.Module):
    """Residual MLP blocks of different widths: regions that differ in cost and bytes."""

    def __init__(self, d: int = 256, n: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(HeteroBlock(d, (1, 8, 2, 4)[i % 4]) for i in range(n))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=1)


def hetero_workload(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = HeteroChain()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 256, 256, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    names = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    return Workload(name="hetero", model=model, inputs=(x,), targets=y,
                    loss_fn=F.cross_entropy, blocks=names)  # fmt: skip


def make_workload(label: str) -> Workload:
    """The benchmark's models by label: ``gpt-<layers>`` or ``hetero-12``."""
    if label.startswith("gpt-"):
        return build_workload("gpt", n_layers=int(label[4:]))
    if label == "hetero-12":
        return hetero_workload()
    raise ValueError(f"unknown model label {label!r}")


def torch_selective(workload: Workload) -> None:
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    aten = torch.ops.aten
    save = {
        aten.mm,
        aten.addmm,
        aten.bmm,
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_efficient_attention,
    }

    def policy(ctx, func, *args, **kwargs):
        packet = getattr(func, "overloadpacket", func)
        return CheckpointPolicy.MUST_SAVE if packet in save else CheckpointPolicy.PREFER_RECOMPUTE

    for name in workload.blocks:
        block = workload.model.get_submodule(name)
        original = block.forward

        def forward(x, original=original):
            return checkpoint(
                original,
                x,
                use_reentrant=False,
                context_fn=lambda: create_selective_checkpoint_contexts(policy),
            )

        block.forward = forward


def methods(budgets: list[str]) -> dict[str, object]:
    fixed = {
        "none": None,
        "all-blocks": lambda w: remat.apply(w.model, remat.by_name(*w.blocks)),
        "every-2": lambda w: remat.apply(w.model, remat.by_name(*w.blocks[::2])),
        "every-3": lambda w: remat.apply(w.model, remat.by_name(*w.blocks[::3])),
        "every-4": lambda w: remat.apply(w.model, remat.by_name(*w.blocks[::4])),
        "sqrt": lambda w: remat.apply(w.model, remat.sqrt()),
        "torch-selective": torch_selective,
    }
    return {**fixed, **{f"remat:{b}%": b for b in budgets}}


def sac_milp_methods(base: Workload, fractions: list[float]) -> tuple[dict[str, object], str]:
    """PyTorch's SAC plans for ``base`` at each budget fraction (one estimation for all),
    and a note on what ran."""
    try:
        import pulp  # noqa: F401  (sac_milp's MILP solver)
        import pwlf  # noqa: F401  (the SAC estimator's trade-off curves)
        from _sac_milp import sac_milp_plan, sac_milp_stats
    except ImportError as err:
        return {}, f"not run: {err} (pip install -e '.[bench]')"
    stats = sac_milp_stats(base)
    plans = {f"sac_milp:{f:g}": sac_milp_plan(base, f, stats=stats) for f in fractions}
    return plans, f"estimators {stats.seconds:.1f} s"


def run_model(label: str, make, args: argparse.Namespace) -> dict:
    base = make()
    loss_of = lambda out, w=base: w.loss_fn(out, w.targets)  # noqa: E731
    profile = remat.profile(base.model, *base.inputs, loss_fn=loss_of)
    fractions = [float(f) for f in args.sac_budgets.split(",") if f]
    sac_plans, sac_note = sac_milp_methods(base, fractions) if fractions else ({}, "")
    rows, workloads = {}, {}
    todo = {**methods(args.budgets.split(",")), **sac_plans}
    while todo:
        name = next(iter(todo))
        how = todo.pop(name)
        w = copy.deepcopy(base)
        loss = lambda out, w=w: w.loss_fn(out, w.targets)  # noqa: E731
        note = ""
        if isinstance(how, (str, int)):  # a percentage, or bytes (a baseline's peak)
            try:
                budget = f"{how}%" if isinstance(how, str) else how
                result = remat.autoplan(
                    w.model, *w.inputs, budget=budget, loss_fn=loss, profile=profile
                )
                note = f"{result.rounds} plan(s); predicted {result.plan.predicted_peak_bytes}"
            except remat.BudgetError as err:
                rows[name] = {"status": "infeasible", "error": str(err)}
                continue
        elif name.startswith("sac_milp:"):
            from _sac_milp import apply_sac_milp

            if how.predicted_peak_bytes < 0:
                rows[name] = {"status": "infeasible", "error": "sac_milp: no feasible plan"}
                continue
            apply_sac_milp(w, how)
            note = (f"predicted {how.predicted_peak_bytes}; budget {how.budget_bytes}; "
                    f"MILPs {how.seconds:.2f} s; {sac_note}")  # fmt: skip
        elif how is not None:
            how(w)
        rows[name] = {"status": "ok", "peak_bytes": measure_step_peak(w.model, w.inputs, loss),
                      "note": note}  # fmt: skip
        workloads[name] = w
        if args.match and not name.startswith(("remat", "none")):
            # remat planned for exactly this baseline's measured peak: the head-to-head row
            todo[f"remat@{name}"] = rows[name]["peak_bytes"]
    # ~35 models of 48 blocks are timed in turn: their gradients would hold 5 GB between turns
    step = functools.partial(step_seconds, free_gradients=True)
    times = interleaved_seconds(workloads, args.steps, args.warmup, step)
    base_time = statistics.median(times["none"])
    for name, ts in times.items():
        rows[name]["ratio"] = statistics.median(ts) / base_time
        rows[name]["step_s"] = ts
    return {"model": label, "step_peak_bytes": profile.step_peak_bytes, "rows": rows,
            "sac_milp": sac_note}  # fmt: skip


def matches(result: dict) -> list[tuple[str, dict, tuple | None]]:
    """For each baseline: its row and the cheapest remat row whose measured peak is not
    higher, as (peak bytes, ratio, name), or None."""
    rows = result["rows"]
    ours = [(r["peak_bytes"], r["ratio"], n) for n, r in rows.items()
            if n.startswith("remat") and r["status"] == "ok"]  # fmt: skip
    out = []
    for name, row in rows.items():
        if name.startswith("remat") or name in ("none", "compile:1.0") or row["status"] != "ok":
            continue
        fits = [o for o in ours if o[0] <= row["peak_bytes"]]
        out.append((name, row, min(fits, key=lambda o: o[1]) if fits else None))
    return out


def compare(result: dict) -> list[str]:
    """For each baseline, the cheapest remat plan whose measured peak is not higher."""
    lines = []
    for name, row, best in matches(result):
        if best is None:
            lines.append(f"  {name}: no remat plan at or below its peak")
            continue
        verdict = "better" if best[1] < row["ratio"] else "not better"
        lines.append(
            f"  {name:<24} {row['peak_bytes'] / 1e6:7.1f} MB x{row['ratio']:.2f}  vs  {best[2]} "
            f"{best[0] / 1e6:7.1f} MB x{best[1]:.2f}: {verdict}"
        )
    return lines


def markdown(results: list[dict]) -> str:
    """The README's table: each baseline against remat's plan for its peak (remat@...) and
    the cheapest remat plan at or below that peak."""
    lines = ["| model | method | peak MB | × none | remat@method | cheapest remat at or below |",
             "| --- | --- | ---: | ---: | --- | --- |"]  # fmt: skip
    for result in results:
        rows = result["rows"]
        for name, row, best in matches(result):
            own = rows.get(f"remat@{name}", {})
            at = (f"{own['peak_bytes'] / 1e6:.1f} MB ×{own['ratio']:.2f}"
                  if own.get("status") == "ok" else own.get("status", "–"))  # fmt: skip
            if best is None:
                cheapest = "none"
            else:
                verdict = "better" if best[1] < row["ratio"] else "**not better**"
                cheapest = f"{best[2]} {best[0] / 1e6:.1f} MB ×{best[1]:.2f} ({verdict})"
            lines.append(f"| {result['model']} | {name} | {row['peak_bytes'] / 1e6:.1f} | "
                         f"{row['ratio']:.2f} | {at} | {cheapest} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(results), 4.5))
    for k, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), k + 1)
        rows = {n: r for n, r in result["rows"].items() if r["status"] == "ok"}
        ours = sorted((r["peak_bytes"] / 1e6, r["ratio"]) for n, r in rows.items()
                      if n.startswith("remat"))  # fmt: skip
        if ours:
            ax.plot(*zip(*ours), "o-", color="C3", label="remat planner")
        families: dict[str, list[tuple[float, float]]] = {}  # sac_milp:0.4 -> sac_milp
        for n, r in rows.items():
            if not n.startswith("remat") and n != "compile:1.0":
                families.setdefault(n.split(":")[0], []).append((r["peak_bytes"] / 1e6, r["ratio"]))
        for i, (family, points) in enumerate(families.items()):
            style = "sD^v<>p"[i % 7] + ("--" if len(points) > 1 else "")
            ax.plot(*zip(*sorted(points)), style, color=f"C{(i + 4) % 10}", label=family,
                    markersize=7)  # fmt: skip
        ax.set_xlabel("measured step peak, MB (new bytes)")
        ax.set_ylabel("step time / none")
        ax.set_title(result["model"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12])
    parser.add_argument("--budgets", default="75,60,50,40,30,25,20")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-hetero", action="store_true")
    parser.add_argument(
        "--no-match",
        dest="match",
        action="store_false",
        help="skip the remat@<baseline> rows (autoplan at each baseline's measured peak)",
    )
    parser.add_argument(
        "--sac-budgets",
        default="0.75,0.6,0.5,0.4,0.3,0.25",
        help="budget fractions for PyTorch's sac_milp rows ('' to skip them)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "planner.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "planner.png")
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from --json")
    parser.add_argument(
        "--markdown", action="store_true", help="only print the README table from --json"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compiled training: torch.compile's activation_memory_budget against remat's "
        "compiled plans (writes --compile-json)",
    )
    parser.add_argument("--compile-models", nargs="+", default=["gpt-12", "hetero-12", "gpt-48"])
    parser.add_argument("--compile-budgets", default="0.9,0.7,0.5,0.3,0.1")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--compile-json", type=Path, default=RESULTS / "planner_compile.json")
    args = parser.parse_args(argv)
    if args.compile:
        return compile_main(args, argv)
    if args.markdown:
        document = json.loads(args.json.read_text())
        print(markdown(document["results"]))
        return document
    if args.replot:
        document = json.loads(args.json.read_text())
        plot(document["results"], args.plot)
        return document

    labels = [f"gpt-{n}" for n in args.layers] + ([] if args.no_hetero else ["hetero-12"])
    models = [(label, lambda label=label: make_workload(label)) for label in labels]
    results = []
    for label, make in models:
        result = run_model(label, make, args)
        results.append(result)
        print(f"\n{label}: un-checkpointed step peak {result['step_peak_bytes'] / 1e6:.1f} MB")
        print(f"  {'method':<24}{'peak MB':>10}{'x none':>8}")
        for name, row in result["rows"].items():
            if row["status"] != "ok":
                print(f"  {name:<24}{'infeasible':>10}")
                continue
            print(f"  {name:<24}{row['peak_bytes'] / 1e6:>10.1f}{row['ratio']:>8.2f}")
        print("At equal or lower measured peak:")
        print("\n".join(compare(result)))
    document = {
        "benchmark": "planner",
        "command": "python benchmarks/planner.py " + " ".join(argv or []),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "threads": torch.get_num_threads()},
        "not_run": {"torch.compile": "run with --compile (results/planner_compile.json)"},
        "results": results,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2))
    plot(results, args.plot)
    return document


def compile_main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """``--compile``: the side-by-side of compiled training (see _compile_side_by_side.py)."""
    from _compile_side_by_side import side_by_side, table

    budgets = [float(b) for b in args.compile_budgets.split(",") if b]
    results = []
    for model in args.compile_models:
        print(f"\n{model} (compiled):", flush=True)
        result = side_by_side(model, budgets, args.rounds)
        results.append(result)
        print("\n".join(table(result)), flush=True)
    document = {
        "benchmark": "planner --compile",
        "command": "python benchmarks/planner.py " + " ".join(argv or sys.argv[1:]),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "threads": torch.get_num_threads()},
        "results": results,
    }  # fmt: skip
    args.compile_json.parent.mkdir(parents=True, exist_ok=True)
    args.compile_json.write_text(json.dumps(document, indent=2))
    return document


if __name__ == "__main__":
    main()
