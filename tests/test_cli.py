"""The ``remat`` command, driven through its argv (and once as a real ``python -m remat``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from remat.bench import SCHEMA
from remat.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_GPT = ["--model", "gpt", "--layers", "2", "--d-model", "32", "--heads", "2"]
TINY_GPT += ["--seq-len", "16", "--vocab", "64", "--batch", "2"]
# activations outweigh parameter gradients here, so percentage budgets are feasible
SMALL_GPT = ["--model", "gpt", "--layers", "4", "--d-model", "64", "--heads", "4"]
SMALL_GPT += ["--seq-len", "64", "--vocab", "128", "--batch", "8"]


def test_help_shows_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "remat bench" in out
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--model" in out
    for name in ("none", "tutorial", "tutorial-function", "remat", "all-blocks"):
        assert f"\n  {name} " in out  # every configuration is listed with its description
    assert "tutorial-reentrant" in out and "_crash" not in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "resnet"], ["'resnet'", "mlp, gpt, convnet", "hf:<arch>"]),
        (["--configs", "remat,fast"], ["'fast'", "tutorial-function", "all-blocks"]),
        (["--dtype", "int8"], ["'int8'", "float32, bfloat16, float16, float64"]),
        (["--device", "tpu"], ["'tpu'", "cpu, cuda"]),
        (["--layers", "2"], ["--layers", "gpt"]),
    ],
)
def test_bad_input_is_one_line_naming_the_valid_choices(capsys, argv, expected):
    assert main(["bench", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("remat bench: error:")
    for text in expected:
        assert text in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_says_so_in_one_line(capsys):
    assert main(["bench", "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_hf_without_transformers_says_which_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert main(["bench", "--model", "hf:gpt2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "remat[hf]" in err


def test_unknown_hf_architecture(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "--model", "hf:nonexistent-arch", "--quiet"]) == 2
    assert "'nonexistent-arch'" in capsys.readouterr().err


def test_wrong_gradients_fail_the_command_and_files_are_written(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "new" / "dir" / "b.png"  # dirs get created
    argv = ["bench", "--batch", "8", "--steps", "1", "--configs", "remat,tutorial-reentrant"]
    assert main([*argv, "--quiet", "--json", str(js), "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # --quiet: no table
    assert "tutorial-reentrant: FAIL" in captured.err and "block1.0.weight" in captured.err
    assert "remat:" not in captured.err

    doc = json.loads(js.read_text())
    assert doc["schema"] == SCHEMA
    assert {"torch_version", "device", "dtype", "model", "parameters", "batch", "python"} <= set(
        doc["environment"]
    )
    rows = {r["name"]: r for r in doc["configs"]}
    assert list(rows) == ["none", "remat", "tutorial-reentrant"]
    assert rows["remat"]["status"] == "ok" and rows["remat"]["grads_match"] is True
    assert rows["tutorial-reentrant"]["status"] == "FAIL"
    assert rows["tutorial-reentrant"]["max_grad_diff"] > 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


@pytest.mark.slow
def test_python_m_remat_bench_prints_the_table(tmp_path):
    # The real console entry point, as a user runs it, on a tiny GPT.
    cmd = [sys.executable, "-m", "remat", "bench", *TINY_GPT, "--steps", "1"]
    cmd += ["--configs", "remat,all-blocks", "--json", str(tmp_path / "g.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("remat bench: gpt", "none", "remat", "all-blocks", "step MB", "saved MB", "ok"):
        assert text in proc.stdout
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["environment"]["sizes"] == {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 2,
        "seq_len": 16,
        "vocab_size": 64,
    }
    assert all(r["status"] == "ok" for r in doc["configs"])


@pytest.mark.slow
def test_hf_gpt2_runs(tmp_path):
    pytest.importorskip("transformers")
    js = tmp_path / "hf.json"
    argv = ["bench", "--model", "hf:gpt2", "--layers", "2", "--d-model", "64", "--heads", "2"]
    argv += ["--seq-len", "32", "--vocab", "128", "--batch", "2", "--steps", "1"]
    assert main([*argv, "--configs", "tutorial,remat", "--quiet", "--json", str(js)]) == 0
    rows = {r["name"]: r for r in json.loads(js.read_text())["configs"]}
    assert all(r["status"] == "ok" and r["grads_match"] for r in rows.values())
    assert rows["remat"]["saved_bytes"] < rows["none"]["saved_bytes"]
    assert rows["remat"]["extra_flops"] > 0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("remat ")


def test_unwritable_output_path_fails_before_running(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["bench", "--quiet", "--plot", str(tmp_path / "file" / "b.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot" in err


def test_policy_configurations_run_and_match(tmp_path, capsys):
    js = tmp_path / "policies.json"
    configs = "every2,save-matmuls,sqrt,offload,auto:60%"
    argv = ["bench", *SMALL_GPT, "--steps", "1", "--configs", configs, "--quiet", "--json", str(js)]
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r["name"]: r for r in json.loads(js.read_text())["configs"]}
    assert list(rows) == ["none", *configs.split(",")]
    for name, row in rows.items():
        assert row["status"] == "ok" and row["grads_match"] is True, name


def test_plan_prints_and_verifies_a_plan(tmp_path, capsys):
    js = tmp_path / "plan.json"
    argv = ["plan", *SMALL_GPT, "--budget", "75%", "--verify", "--json", str(js)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Plan by chain" in out and "within the budget" in out
    doc = json.loads(js.read_text())
    assert doc["verify"]["measured_peak_bytes"] <= doc["plan"]["budget_bytes"]


def test_plan_infeasible_budget_exits_1(capsys):
    assert main(["plan", *TINY_GPT, "--budget", "1KB"]) == 1
    assert "smallest feasible budget" in capsys.readouterr().err
