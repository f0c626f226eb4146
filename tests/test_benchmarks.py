"""benchmarks/planner.py end to end on a tiny model: every method runs and is measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_planner_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its sibling _sac_milp.py
    try:
        spec = importlib.util.spec_from_file_location(
            "planner_benchmark", BENCHMARKS / "planner.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_planner_benchmark_runs_every_method(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # main() imports _sac_milp lazily
    bench = load_planner_benchmark()
    out = tmp_path / "planner.json"
    plot = tmp_path / "planner.png"
    document = bench.main(["--layers", "2", "--no-hetero", "--steps", "1", "--warmup", "0",
                           "--budgets", "75", "--sac-budgets", "0.75",
                           "--json", str(out), "--plot", str(plot)])  # fmt: skip
    assert json.loads(out.read_text()) == document
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
    table = bench.markdown(document["results"])
    assert "| gpt-2 | torch-selective |" in table
    assert plot.stat().st_size > 0
