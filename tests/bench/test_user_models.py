"""``remat bench`` and ``remat plan`` on a model defined only in the user's own file or
module: keyword inputs, its own loss, ``--model-arg`` options, a saved plan benched with
``plan:<path.json>``; ``hf:./config.json`` with config fields; what a bad factory gets."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from remat.bench.hf_workloads import build_hf_workload
from remat.bench.runner import BenchResult, ConfigResult, Environment, time_spread
from remat.bench.table import print_table
from remat.bench.user_models import build_user_workload, parse_model_args
from remat.cli import main

pytest.importorskip("transformers")

SCORER = """
import torch
from torch import nn


class Scorer(nn.Module):  # defined only in this file
    def __init__(self, width, layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.Tanh(), nn.Linear(4 * width, width))
            for _ in range(layers)
        )

    def forward(self, x, *, scale):
        x = x * scale
        for layer in self.layers:
            x = layer(x)
        return x


class Gapped(Scorer):
    def forward(self, x, *, scale):
        for layer in self.layers:
            x = layer(x) * scale  # code between the layers
        return x


def build(width=64, layers=8, batch=1024):
    inputs = {"x": torch.randn(batch, width), "scale": torch.tensor(0.5)}
    return Scorer(width, layers), inputs, lambda out: (out**2).mean()


def build_gapped(width=64, layers=8, batch=256):
    inputs = {"x": torch.randn(batch, width), "scale": torch.tensor(0.5)}
    return Gapped(width, layers), inputs, lambda out: (out**2).mean()


def model_only():
    return Scorer(8, 2)
"""
MODULE = "remat_test_user_scorer"


@pytest.fixture
def scorer(tmp_path, monkeypatch):
    """The file's path; the same file importable as a module."""
    path = tmp_path / f"{MODULE}.py"
    path.write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop(MODULE, None)


def own_loss(path: Path, **options) -> float:
    """The loss the factory's own loss function gives, seeded as the bench seeds it."""
    spec = importlib.util.spec_from_file_location("scorer_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model, inputs, loss_fn = module.build(**options)
    return loss_fn(model(**inputs)).item()


def test_bench_runs_a_factory_from_a_file_with_keyword_inputs_and_its_loss(scorer, tmp_path):
    js = tmp_path / "bench.json"
    argv = ["bench", "--model", f"{scorer}:build", "--model-arg", "layers=3"]
    argv += [
        "--configs",
        "remat,per-block,all-blocks",
        "--steps",
        "1",
        "--quiet",
        "--json",
        str(js),
    ]
    assert main(argv) == 0
    doc = json.loads(js.read_text())
    env, rows = doc["environment"], {r["name"]: r for r in doc["configs"]}
    assert env["model_args"] == {"layers": 3} and env["batch"] == 1024
    assert env["parameters"] == 3 * (2 * 64 * 256 + 256 + 64)
    assert list(rows) == ["none", "remat", "per-block", "all-blocks"]
    for row in rows.values():
        assert row["status"] == "ok" and row["grads_match"] is True
        assert row["loss"] == pytest.approx(own_loss(scorer, layers=3), rel=1e-6)
    # checkpointing every layer keeps only the layers' inputs
    assert rows["all-blocks"]["saved_bytes"] < rows["none"]["saved_bytes"]


def test_plan_on_a_module_factory_verifies_and_its_saved_plan_is_what_bench_runs(
    scorer, tmp_path, capsys
):
    plan_json = tmp_path / "plan.json"
    spec = f"{MODULE}:build"
    argv = ["plan", "--model", spec, "--budget", "50%", "--verify", "--json", str(plan_json)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "within the budget" in out and "MiB" not in out
    report = json.loads(plan_json.read_text())
    assert report["verify"]["measured_peak_bytes"] <= report["plan"]["budget_bytes"]
    assert report["verify"]["max_grad_diff"] == 0

    js = tmp_path / "bench.json"
    argv = ["bench", "--model", spec, "--configs", f"plan:{plan_json}", "--steps", "1"]
    assert main([*argv, "--quiet", "--json", str(js)]) == 0
    none, planned = json.loads(js.read_text())["configs"]
    assert planned["status"] == "ok" and planned["grads_match"] is True
    assert planned["saved_bytes"] < none["saved_bytes"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--model", "{file}:build", "--batch", "4"], "--model-arg batch=N"),
        (["bench", "--model", "{file}:build", "--layers", "2"], "size flags apply"),
        (["bench", "--model", "mlp", "--model-arg", "layers=3"], "--model-arg applies"),
        (["bench", "--model", "{file}:build", "--model-arg", "layers"], "expected key=value"),
        (["bench", "--model", "{file}:nothing"], "has no callable 'nothing'"),
        (["bench", "--model", "no/such/file.py:build"], "no file 'no/such/file.py'"),
        (["plan", "--model", "no_such_module_xyz:build", "--budget", "50%"], "cannot import"),
        (["plan", "--model", "{file}:model_only", "--budget", "50%"], "must return (model, inputs"),
        (["bench", "--configs", "plan:no/such/plan.json"], "plan:no/such/plan.json: cannot read"),
        (["bench", "--configs", "plan:{file}"], "not JSON"),
    ],
)
def test_bad_user_model_input_exits_2_naming_it(scorer, capsys, argv, expected):
    argv = [a.format(file=scorer) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_one_region_refuses_blocks_with_code_between_them(scorer, tmp_path, capsys):
    """Gapped multiplies between its layers: the layers cannot run as one region."""
    argv = ["bench", "--model", f"{scorer}:build_gapped", "--configs", "remat", "--steps", "1"]
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "remat: crashed" in err and "Gapped.forward does something in between" in err


def test_plan_for_layers_with_code_between_them_holds_its_budget(scorer, capsys):
    """No segment spans Gapped's layers (the engine could not keep it one region): 50% is
    out of reach, and the least budget the error names is one that --verify then holds."""
    argv = ["plan", "--model", f"{MODULE}:build_gapped", "--budget", "50%", "--verify"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    least = err.split("smallest feasible budget is ")[1].split(" B")[0].replace(",", "")
    assert main([*argv[:4], least, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "within the budget" in out and "one segment" not in out


def test_a_plan_for_another_model_is_refused(scorer, tmp_path):
    plan_json = tmp_path / "plan.json"
    gpt = ["--model", "gpt", "--layers", "2", "--d-model", "32", "--heads", "2", "--seq-len", "16"]
    assert main(["plan", *gpt, "--vocab", "64", "--budget", "90%", "--json", str(plan_json)]) == 0
    js = tmp_path / "bench.json"
    argv = ["bench", "--model", f"{scorer}:build", "--configs", f"plan:{plan_json}"]
    assert main([*argv, "--steps", "1", "--quiet", "--json", str(js)]) == 1
    planned = json.loads(js.read_text())["configs"][1]
    assert planned["status"] == "crashed" and "blocks.0" in planned["error"]


def test_model_args_are_python_literals_or_strings():
    assert parse_model_args(["layers=4", "name=tiny", "bias=False", "ratio=0.5", "x="]) == {
        "layers": 4,
        "name": "tiny",
        "bias": False,
        "ratio": 0.5,
        "x": "",
    }


def test_a_factory_returning_positional_inputs_and_no_loss(tmp_path):
    path = tmp_path / "positional.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(3, 4)\n"
    )
    w = build_user_workload(f"{path}:build", options={}, device="cpu", dtype=torch.float64, seed=0)
    assert w.kwargs == {} and w.inputs[0].dtype == torch.float64
    assert w.blocks == ("0", "1")
    out = w.model(*w.inputs)
    assert w.loss_of(out).item() == pytest.approx(out.sum().item())  # profile's default loss


def test_hf_config_file_keeps_its_sizes_and_takes_config_fields(tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    w = build_hf_workload(str(tmp_path / "config.json"), config={"num_key_value_heads": 2})
    cfg = w.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 96, 3)
    assert cfg.num_key_value_heads == 2 and cfg.vocab_size == 100
    assert w.kwargs == {} and w.inputs[0].shape == (8, 32)  # seq_len: the position table
    assert len(w.blocks) == 3
    folder = build_hf_workload(str(tmp_path), n_layers=2)  # a folder holding config.json
    assert folder.model.config.num_hidden_layers == 2


def test_hf_json_records_the_sizes_it_built(tmp_path):
    js = tmp_path / "gpt2.json"
    assert (
        main(
            [
                "bench",
                "--model",
                "hf:gpt2",
                "--configs",
                "none",
                "--steps",
                "1",
                "--quiet",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    sizes = json.loads(js.read_text())["environment"]["sizes"]
    assert sizes == {
        "n_layers": 4,
        "d_model": 256,
        "n_heads": 4,
        "seq_len": 256,
        "vocab_size": 2048,
    }


def test_noisy_timings_are_flagged_not_reported_as_results(capsys):
    assert time_spread([1.0, 1.1, 0.9]) == pytest.approx(1.1)
    env = Environment(
        remat_version="0", torch_version="0", python="3", platform="x", device="cpu",
        device_name="cpu", dtype="float32", model="mlp", parameters=1, batch=1, sizes={},
        steps=3, warmup=1, seed=0,
    )  # fmt: skip
    steady = ConfigResult(name="none", step_times_s=[1.0, 1.0, 1.1], median_step_s=1.0)
    busy = ConfigResult(name="remat", step_times_s=[1.0, 1.1, 3.5], median_step_s=1.1)
    for r in (steady, busy):
        r.time_spread = time_spread(r.step_times_s)
    result = BenchResult(environment=env, configs=[steady, busy])
    assert result.noisy == ["remat"]
    print_table(result)
    out = capsys.readouterr().out
    assert "warning" in out and "remat: a round took more than 2×" in out
    assert "218%" in out  # remat's spread: (3.5 - 1.1) / 1.1
