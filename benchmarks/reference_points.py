"""The planner issue's reference points on the 12-block GPT, and what the cost model adds.

The issue gives its reference figures for ``--model gpt`` (12 blocks, d=256, 8 heads, seq 256,
batch 8, float32) in MiB: none 413 MiB is this model's 433.2 MB step peak. It asks for
``≤ 1.10`` at ``≤ 215 MiB`` and ``≤ 1.18`` at ``≤ 130 MiB``. This plans at those budgets with
``remat.autoplan``, from two profiles read several ways (an ablation):

- ``full``: the default profile (``op_engines="auto"``: op-level options run on the tape
  engine where a block has no random or in-place op), as measured: a recomputation stops at
  the region's last saved tensor (early stop) and op-level options pay the measured fixed
  overhead of their engine;
- ``no-overhead``: as ``full``, but op-level options cost only the ops they recompute;
- ``replay``: a profile with ``op_engines="replay"`` (PyTorch's selective checkpointing
  re-running the region, what remat used before the tape engine), read as measured.

It measures each plan's step peak with the tracker and its step time against no
checkpointing, interleaved in one process (median of ``--rounds``), prints a table and writes
``results/reference_points.json``.

Run: ``python benchmarks/reference_points.py [--rounds 12] [--budgets-mib 215 130]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
from pathlib import Path

import torch
from _timing import interleaved_seconds, step_seconds

import remat
from remat.bench.workloads import build_workload
from remat.profiling.profile_data import Profile
from remat.profiling.step import measure_step_peak

RESULTS = Path(__file__).parent / "results"
MiB = 2**20
TARGETS = {215: 1.10, 130: 1.18}  # the reference points (MiB: time ratio)


def ablations(auto: Profile, replay: Profile) -> dict[str, Profile]:
    """The readings compared: see the module docstring."""
    regions = tuple(dataclasses.replace(r, op_overhead=0.0) for r in auto.regions)
    return {
        "full": auto,
        "no-overhead": dataclasses.replace(auto, regions=regions),
        "replay": replay,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", type=Path, default=RESULTS / "reference_points.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = build_workload("gpt", n_layers=args.layers)
    loss_of = lambda out: base.loss_fn(out, base.targets)  # noqa: E731
    profile = remat.profile(base.model, *base.inputs, loss_fn=loss_of)
    replay = remat.profile(base.model, *base.inputs, loss_fn=loss_of, op_engines="replay")
    workloads = {"none": base}
    rows: dict[str, dict] = {}
    for mib in args.budgets_mib:
        for reading, prof in ablations(profile, replay).items():
            w = copy.deepcopy(base)
            loss = lambda out, w=w: w.loss_fn(out, w.targets)  # noqa: E731
            name = f"{reading}@{mib}MiB"
            try:
                result = remat.autoplan(
                    w.model, *w.inputs, budget=mib * MiB, loss_fn=loss, profile=prof
                )
            except remat.BudgetError as err:
                rows[name] = {"status": "infeasible", "error": str(err)}
                continue
            rows[name] = {
                "status": "ok",
                "budget_mib": mib,
                "reading": reading,
                "choices": list(result.plan.choices),
                "predicted_extra": result.plan.extra_cost / profile.forward_cost,
                "peak_bytes": measure_step_peak(w.model, w.inputs, loss),
            }
            workloads[name] = w
    times = interleaved_seconds(workloads, args.rounds, 1, step_seconds)
    base_time = statistics.median(times["none"])
    none_mib = profile.step_peak_bytes / MiB
    print(f"gpt-{args.layers}: none {none_mib:.1f} MiB, {base_time * 1e3:.0f} ms per step; "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'plan':<24}{'peak MiB':>10}{'x none':>8}{'target':>8}  predicted extra (of fwd)")
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"{name:<24}{'infeasible':>10}")
            continue
        row["ratio"] = statistics.median(times[name]) / base_time
        row["step_s"] = times[name]
        target = TARGETS.get(row["budget_mib"])
        mark = "" if target is None else f"≤{target:.2f}"
        print(f"{name:<24}{row['peak_bytes'] / MiB:>10.1f}{row['ratio']:>8.3f}{mark:>8}"
              f"  {row['predicted_extra']:.3f}")  # fmt: skip
    document = {
        "command": "python benchmarks/reference_points.py " + " ".join(argv or []),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "none": {"peak_bytes": profile.step_peak_bytes, "step_s": times["none"]},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2))
    return document


if __name__ == "__main__":
    main()
