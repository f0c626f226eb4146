"""benchmarks/planner.py end to end on a tiny model: every method runs and is measured.

It runs as a script, in its own process, as users run it: PyTorch's SAC estimator leaves
fake tensors behind that a gc-counting test later in the suite would see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PLANNER = Path(__file__).parents[1] / "benchmarks" / "planner.py"


def run_planner(*args: str) -> str:
    done = subprocess.run([sys.executable, str(PLANNER), *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_planner_benchmark_runs_every_method(tmp_path):
    out, plot = tmp_path / "planner.json", tmp_path / "planner.png"
    run_planner("--layers", "2", "--no-hetero", "--steps", "1", "--warmup", "0",
                "--budgets", "75", "--sac-budgets", "0.75",
                "--json", str(out), "--plot", str(plot))  # fmt: skip
    document = json.loads(out.read_text())
    (result,) = document["results"]
    rows = result["rows"]
    assert rows["none"]["peak_bytes"] == result["step_peak_bytes"]
    assert rows["none"]["ratio"] == 1.0
    baselines = ["all-blocks", "every-2", "sqrt", "torch-selective"]
    try:
        import pulp  # noqa: F401
        import pwlf  # noqa: F401

        baselines.append("sac_milp:0.75")
    except ImportError:
        assert "not run" in result["sac_milp"]
    for name in ["remat:75%", *baselines]:
        assert rows[name]["status"] == "ok", (name, rows[name])
        assert 0 < rows[name]["peak_bytes"] < rows["none"]["peak_bytes"]
    for name in baselines:  # remat planned for each baseline's peak fits it, measured
        mine = rows[f"remat@{name}"]
        if mine["status"] == "ok":
            assert mine["peak_bytes"] <= rows[name]["peak_bytes"]
        else:
            assert "budget" in mine["error"]
    assert plot.stat().st_size > 0
    table = run_planner("--markdown", "--json", str(out))
    assert "| gpt-2 | torch-selective |" in table
