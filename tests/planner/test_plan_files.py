"""Plans saved to files: ``Plan.to_json``'s file and ``remat plan --json``'s report both load,
with ``Plan.from_json`` and ``remat.load_plan``, and apply to the model they were made for;
a path or file that is not a plan says which and why."""

from __future__ import annotations

import json

import pytest

import remat
from conftest import tiny_gpt
from remat.bench.configurations import load_plan_file
from remat.cli import main

SIZES = dict(n_layers=4, seq_len=32, d_model=32, n_heads=4, vocab_size=32)
CLI_SIZES = ["--layers", "4", "--seq-len", "32", "--d-model", "32", "--heads", "4"]
CLI_SIZES += ["--vocab", "32", "--batch", "2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report ``remat plan --json --verify`` writes for a small GPT, and its path."""
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    argv = ["plan", "--model", "gpt", *CLI_SIZES, "--budget", "70%", "--verify"]
    assert main([*argv, "--json", str(path)]) == 0
    return path


def test_the_cli_report_loads_with_from_json_and_load_plan_and_applies(report):
    data = json.loads(report.read_text())
    assert {"plan", "verify", "step_peak_bytes"} <= set(data) and "regions" not in data
    expected = remat.Plan.from_dict(data["plan"])
    assert any(r.action != "store" for r in expected.regions)  # a plan that does something
    assert remat.Plan.from_json(report.read_text()) == expected
    assert remat.load_plan(report) == expected == remat.load_plan(str(report))
    assert load_plan_file(str(report)) == expected  # remat bench's plan:<path.json>
    workload = tiny_gpt(**SIZES)
    remat.apply_plan(workload.model, remat.load_plan(report))
    checkpointed = {r.name for r in expected.regions if r.action != "store"}
    assert checkpointed <= set(remat.applied(workload.model))
    check = remat.verify_plan(workload.model, expected, *workload.inputs, loss_fn=workload.loss_of)
    assert check.ok, check
    assert check.measured_peak_bytes == data["verify"]["measured_peak_bytes"]


def test_a_plan_saved_with_to_json_loads_alike(report, tmp_path):
    plan = remat.load_plan(report)
    path = tmp_path / "saved.json"
    path.write_text(plan.to_json(indent=2))
    assert remat.load_plan(path) == plan == remat.Plan.from_json(path.read_text())


def test_a_missing_or_unreadable_file_is_a_value_error_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "plan.json"
    with pytest.raises(ValueError, match=f"^remat.load_plan: {missing}: cannot read it"):
        remat.load_plan(missing)
    with pytest.raises(ValueError, match=f"^remat.load_plan: {tmp_path}: cannot read it"):
        remat.load_plan(tmp_path)  # a directory
    with pytest.raises(ValueError, match=f"^configuration plan:{missing}: cannot read it"):
        load_plan_file(str(missing))
    with pytest.raises(TypeError, match="^remat.load_plan: path must be a str or os.PathLike"):
        remat.load_plan(3)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", r"not JSON"),
        ("[1, 2]", r"plan must be a JSON object"),
        ('{"step_peak_bytes": 1}', r"missing field\(s\) 'regions'"),
        ('{"plan": {"regions": []}}', r"missing field\(s\)"),
        ('{"plan": 3, "verify": null}', r"plan must be a JSON object"),
    ],
)
def test_a_file_that_is_not_a_plan_is_a_plan_error_naming_the_path(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(remat.PlanError, match=f"^remat.load_plan: {path}: .*{match}"):
        remat.load_plan(path)
    with pytest.raises(ValueError, match=f"^configuration plan:{path}: .*{match}"):
        load_plan_file(str(path))
