"""Planner speed: how long each solver takes on chains of 12 to 200 regions.

Chains are synthetic and seeded: heterogeneous regions (sizes and costs drawn per region) and
a GPT-like chain of identical blocks whose op-level menus come from ``solve_ops``. Each
solver plans the chain at 30% and 60% of its un-checkpointed peak (``"30%"``, ``"60%"``);
the table gives the wall time (best of ``--repeats``), the extra cost relative to one forward,
and the predicted peak relative to the budget. ``pareto`` rows time the whole frontier.
Timings on a shared machine are noisy; the best of several repeats is reported.

Run: ``python benchmarks/planner_speed.py [--repeats 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from remat.errors import BudgetError
from remat.solver import (
    Chain,
    Op,
    Region,
    pareto,
    plan_chain,
    store_all_peak,
    with_ops,
)

MiB = 2**20


def heterogeneous(n: int, seed: int = 0) -> Chain:
    rng = random.Random(seed)
    regions = []
    for i in range(n):
        inp = rng.randint(1, 8) * MiB
        regions.append(
            Region(
                name=f"layer{i}",
                fwd_cost=rng.uniform(1, 10),
                input_bytes=inp,
                saved_bytes=inp + rng.randint(2, 40) * MiB + rng.randint(0, 4095),
                output_bytes=rng.randint(1, 8) * MiB,
                transient_bytes=rng.randint(0, 6) * MiB,
            )
        )
    return Chain(regions)


def gpt_like(n: int) -> Chain:
    """Blocks shaped like the 12-block GPT of issue 6 (d=256, seq 256, batch 8, float32)."""
    x = 8 * 256 * 256 * 4  # one (B, T, C) activation
    att = 8 * 8 * 256 * 256 * 4  # one (B, heads, T, T) matrix
    ops = [  # (name, output bytes, relative cost): a rough transformer block
        Op(name="ln1", output_bytes=x, recompute_cost=0.2),
        Op(name="qkv.mm", output_bytes=3 * x, recompute_cost=3.0),
        Op(name="attn.scores", output_bytes=att, recompute_cost=1.0),
        Op(name="attn.softmax", output_bytes=att, recompute_cost=0.5),
        Op(name="attn.out", output_bytes=x, recompute_cost=1.0),
        Op(name="proj.mm", output_bytes=x, recompute_cost=1.0),
        Op(name="ln2", output_bytes=x, recompute_cost=0.2),
        Op(name="fc.mm", output_bytes=4 * x, recompute_cost=4.0),
        Op(name="gelu", output_bytes=4 * x, recompute_cost=0.4),
        Op(name="fc2.mm", output_bytes=x, recompute_cost=4.0),
    ]
    saved = x + sum(o.output_bytes for o in ops)
    cost = sum(o.recompute_cost for o in ops)
    block = Region(
        name="b",
        fwd_cost=cost,
        input_bytes=x,
        saved_bytes=saved,
        output_bytes=x,
        transient_bytes=att,
    )
    menu = with_ops(block, ops, max_options=6)
    return Chain([Region(**{**_fields(menu), "name": f"blocks.{i}"}) for i in range(n)])


def _fields(r: Region) -> dict:
    return {f: getattr(r, f) for f in Region.__dataclass_fields__}


def best_time(fn, repeats: int):
    """(result, best wall seconds, CPU seconds of that run): on a shared machine the wall
    time includes waiting for a core; the CPU time does not."""
    out, best, cpu = None, float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return out, best, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/planner_speed.json")
    args = p.parse_args()
    chains = {f"hetero-{n}": heterogeneous(n) for n in (12, 48, 100, 200)}
    chains |= {f"gpt-ops-{n}": gpt_like(n) for n in (12, 48)}
    rows = []
    for cname, chain in chains.items():
        top = store_all_peak(chain)
        for budget in ("30%", "60%"):
            runs = [
                ("chain", lambda c=chain, b=budget: plan_chain(c, b)),
                ("chain-flat", lambda c=chain, b=budget: plan_chain(c, b, nested=False)),
                ("sqrt", lambda c=chain, b=budget: plan_chain(c, b, solver="sqrt")),
                ("every-n", lambda c=chain, b=budget: plan_chain(c, b, solver="every-n")),
                ("greedy", lambda c=chain, b=budget: plan_chain(c, b, solver="greedy")),
            ]
            for solver, fn in runs:
                try:
                    plan, secs, cpu = best_time(fn, args.repeats)
                except BudgetError as e:
                    rows.append(
                        {
                            "chain": cname,
                            "budget": budget,
                            "solver": solver,
                            "seconds": None,
                            "error": f"infeasible (needs {e.min_feasible_bytes / top:.0%})",
                        }
                    )
                    continue
                rows.append(
                    {
                        "chain": cname,
                        "regions": len(chain),
                        "budget": budget,
                        "budget_bytes": plan.budget_bytes,
                        "solver": solver,
                        "seconds": secs,
                        "cpu_seconds": cpu,
                        "extra_cost_ratio": plan.extra_cost / chain.forward_cost,
                        "peak_over_budget": plan.predicted_peak_bytes / plan.budget_bytes,
                        "resolution_bytes": plan.resolution_bytes,
                    }
                )
        if len(chain) <= 48:
            front, secs, cpu = best_time(lambda c=chain: pareto(c), 1)
            rows.append(
                {
                    "chain": cname,
                    "regions": len(chain),
                    "budget": "frontier",
                    "solver": "pareto",
                    "seconds": secs,
                    "cpu_seconds": cpu,
                    "points": len(front),
                }
            )
    cols = ("chain", "budget", "solver", "wall s", "cpu s", "extra/fwd", "peak/budget")
    header = "{:<12} {:<8} {:<11} {:>7} {:>7} {:>9} {:>11}".format(*cols)
    print(header)
    print("-" * len(header))
    for r in rows:
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.3f}"
        cpu = f"{r['cpu_seconds']:.3f}" if "cpu_seconds" in r else "-"
        extra = f"{r['extra_cost_ratio']:.3f}" if "extra_cost_ratio" in r else ""
        fill = f"{r['peak_over_budget']:.3f}" if "peak_over_budget" in r else ""
        note = r.get("error") or (f"{r['points']} points" if "points" in r else "")
        print(
            "{:<12} {:<8} {:<11} {:>7} {:>7} {:>9} {:>11}  {}".format(
                r["chain"], r["budget"], r["solver"], secs, cpu, extra, fill, note
            )
        )
    big = [r for r in rows if r.get("regions") == 200 and r["solver"] == "chain"]
    wall = max(r["seconds"] for r in big)
    cpu = max(r["cpu_seconds"] for r in big)
    print(f"\n200-region chain, solver='chain': {wall:.2f} s wall, {cpu:.2f} s CPU (target < 2 s)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": args.repeats,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
