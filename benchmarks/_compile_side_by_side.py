"""``benchmarks/planner.py --compile``: torch.compile's ``activation_memory_budget`` against
remat's compiled plans at the peak each budget measures.

For each model, one process per configuration (``_compile_worker.py``):

1. ``compile:<b>`` for b in 1.0 (no recomputation: the baseline) and ``--compile-budgets``:
   compiled, warmed up, its step's peak measured from the allocators' events;
2. one planner process runs ``remat.autoplan(..., compile=True)`` at each of those measured
   peaks (``remat@compile:<b>``: the head-to-head row) and at 25%, 50% and 75% of the
   baseline's compiled peak (``remat:<p>%``), each plan measured compiled;
3. each remat plan in its own timing process, its compiled peak measured again;
4. ``--rounds`` interleaved rounds (the order rotates each round): each process times one
   step per round. A row's time is the median over rounds of its step time divided by the
   baseline's in the same round; the spread is those ratios' min and max.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).parent
WORKER = BENCH_DIR / "_compile_worker.py"
PERCENTAGES = ("75%", "50%", "25%")


class Worker:
    """A configuration's process: started, compiled and measured, then timed step by step."""

    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        spec = {**spec, "bench_dir": str(BENCH_DIR)}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name}: the worker ended (exit {self.process.wait()})")

    def step(self) -> float:
        self.process.stdin.write("step\n")
        return self.read()["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=120)


def side_by_side(model: str, budgets: list[float], rounds: int) -> dict:
    """The rows of one model (see the module docstring)."""
    rows: dict[str, dict] = {}
    timed: dict[str, Worker] = {}
    try:
        for budget in [1.0, *budgets]:  # one at a time: compilation takes both cores
            name = f"compile:{budget}"
            timed[name] = Worker(name, {"model": model, "kind": "compile", "budget": budget})
            rows[name] = {**timed[name].read(), "status": "ok", "budget": budget}
            print(f"  {name}: peak {rows[name]['peak_bytes'] / 1e6:.1f} MB", flush=True)
        targets = {f"remat@compile:{b}": rows[f"compile:{b}"]["peak_bytes"] for b in budgets}
        targets.update({f"remat:{p}": p for p in PERCENTAGES})
        planner = Worker("autoplan", {"model": model, "kind": "autoplan",
                                      "budgets": list(targets.values())})  # fmt: skip
        for name in targets:
            answer = planner.read()
            rows[name] = answer
            print(f"  {name}: {answer['status']}", flush=True)
        planner.close()
        for name, row in rows.items():
            if name.startswith("remat") and row["status"] == "ok":
                timed[name] = Worker(name, {"model": model, "kind": "plan", "plan": row["plan"]})
                row["timed_peak_bytes"] = timed[name].read()["peak_bytes"]
        seconds = _interleaved(timed, rounds)
    finally:
        for worker in timed.values():
            worker.close()
    base = seconds["compile:1.0"]
    for name, ts in seconds.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows[name].update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                          ratio_max=max(ratios), step_s=ts)  # fmt: skip
    return {"model": model, "rounds": rounds, "rows": rows}


def _interleaved(workers: dict[str, Worker], rounds: int) -> dict[str, list[float]]:
    names = list(workers)
    for name in names:  # one untimed step each: every process warm
        workers[name].step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(workers[name].step())
    return times


def table(result: dict) -> list[str]:
    """One line per compile budget: its peak and time, remat's plan at that peak, and
    remat's own percentage plans; non-monotonic compile peaks are marked."""
    rows = result["rows"]
    lines = [f"{'configuration':<22}{'peak MB':>10}{'x time':>8}{'spread':>14}  note"]

    def line(name: str, note: str = "") -> str:
        row = rows[name]
        if row["status"] != "ok":
            return f"{name:<22}{'infeasible':>10}"
        spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
        return (f"{name:<22}{row['peak_bytes'] / 1e6:>10.1f}{row['ratio']:>8.2f}"
                f"{spread:>14}  {note}").rstrip()  # fmt: skip

    compile_names = sorted((n for n in rows if n.startswith("compile:")),
                           key=lambda n: -rows[n]["budget"])  # fmt: skip
    previous = None
    for name in compile_names:
        peak = rows[name]["peak_bytes"]
        note = "peak above the larger budget's" if previous is not None and peak > previous else ""
        previous = peak
        lines.append(line(name, note))
        remat_name = f"remat@{name}"
        if remat_name in rows:
            lines.append(line(remat_name, _verdict(rows, name, remat_name)))
    for p in PERCENTAGES:
        name = f"remat:{p}"
        row = rows[name]
        within = row["status"] == "ok" and row["peak_bytes"] <= row["budget_bytes"]
        lines.append(line(name, f"budget {row.get('budget_bytes', 0) / 1e6:.1f} MB"
                                + (", within" if within else "")))  # fmt: skip
    return lines


def _verdict(rows: dict, theirs: str, ours: str) -> str:
    a, b = rows[theirs], rows[ours]
    if b["status"] != "ok":
        return ""
    lower = "equal or lower peak" if b["peak_bytes"] <= a["peak_bytes"] else "HIGHER PEAK"
    faster = "as fast or faster" if b["ratio"] <= a["ratio"] else "slower"
    return f"{lower}, {faster}"
