"""Does the target cost model rank plans as the machine does?

The 12-block GPT is profiled on the meta device for ``target_device="cpu"`` (this CPU's measured
matmul FLOP/s, copy bandwidth and per-op time: nothing is timed on the model itself), and the
planner's frontier is taken from that profile. Each plan on it (at most ``--plans``, spread
over the frontier) is then applied to a real CPU copy of the model and its training step
timed, interleaved with the others over ``--rounds`` rounds. The predicted step time is the
forward's predicted cost, twice that for the backward, plus the plan's predicted
recomputation; the Spearman rank correlation of predicted against measured (median) times is
the result (the target issue asks for at least 0.9).

Run: ``python benchmarks/target_ranking.py [--plans 8] [--rounds 5] [--json PATH]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
from _timing import interleaved_seconds, step_seconds

import remat
from remat.bench.workloads import build_workload


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def spread(plans: list[remat.Plan], count: int) -> list[remat.Plan]:
    """At most ``count`` plans, evenly spaced over the frontier, both ends included."""
    if len(plans) <= count:
        return plans
    step = (len(plans) - 1) / (count - 1)
    return [plans[round(i * step)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", default="benchmarks/results/target_ranking.json")
    args = parser.parse_args()

    meta = build_workload("gpt", device="meta", n_layers=args.layers)
    prof = remat.profile(meta.model, *meta.inputs, loss_fn=meta.loss_of, target_device="cpu")
    plans = spread(remat.pareto(prof), args.plans)

    base = build_workload("gpt", n_layers=args.layers)
    workloads = {}
    for i, plan in enumerate(plans):
        w = copy.deepcopy(base)
        remat.apply_plan(w.model, plan)
        workloads[f"plan{i}"] = w
    times = interleaved_seconds(workloads, args.rounds, 1, step_seconds)
    measured = [statistics.median(times[f"plan{i}"]) for i in range(len(plans))]
    predicted = [3 * p.forward_cost + p.extra_cost for p in plans]
    rho = spearman(predicted, measured)

    print(f"GPT {args.layers} blocks, CPU, {args.rounds} interleaved rounds; costs predicted "
          f"on meta for target=cpu")  # fmt: skip
    print(f"{'plan':<6} {'peak MB':>8} {'pred. ms':>9} {'meas. ms':>9}  segments / recomputed")
    rows = []
    for i, (p, pr, me) in enumerate(zip(plans, predicted, measured)):
        changed = sum(r.action != "store" for r in p.regions)
        print(f"plan{i:<2} {p.predicted_peak_bytes / 1e6:8.2f} {pr * 1e3:9.1f} {me * 1e3:9.1f}"
              f"  {len(p.segments)} / {changed}")  # fmt: skip
        rows.append({"predicted_peak_bytes": p.predicted_peak_bytes, "predicted_s": pr,
                     "measured_s": me, "times_s": times[f"plan{i}"]})  # fmt: skip
    print(f"Spearman rank correlation, predicted vs measured step time: {rho:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "torch": torch.__version__, "platform": platform.platform(), "layers": args.layers,
        "rounds": args.rounds, "spearman": rho, "plans": rows,
    }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
