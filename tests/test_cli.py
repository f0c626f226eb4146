"""The ``remat`` command, driven through its argv (and once as a real ``python -m remat``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remat.bench.runner import SCHEMA
from remat.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_LLAMA = {  # a local config.json, as hf:./config.json reads it
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--model", "gpt", "--heads", "3"], ["--d-model 256", "--heads 3"]),
        (["bench", "--model", "gpt", "--layers", "0"], ["n_layers=0"]),
        (["bench", "--model", "gpt", "--seq-len", "0"], ["seq_len=0"]),
        (["bench", "--configs", "auto:abc"], ["'abc'", "does not parse"]),
        (["bench", "--configs", "auto:-1"], ["'-1'"]),
        (["bench", "--configs", "auto:1e999"], ["'1e999'", "not a finite number"]),
        (["bench", "--configs", "auto"], ["auto:<budget> needs a budget"]),
        (["bench", "--configs", "auto:40"], ["did you mean 40%?"]),
        (["bench", "--json", "."], ["--json .", "is a directory"]),
        (["bench", "--plot", "/proc/no/such/plot.png"], ["--plot /proc/no/such/plot.png"]),
        (["plan", "--budget", "1e999"], ["'1e999'", "not a finite number"]),
        (["plan", "--budget", "40"], ["--budget 40", "did you mean 40%?"]),
        (["plan", "--budget", "40%", "--dtype", "int8"], ["--dtype int8", "float32"]),
        (["plan", "--budget", "40%", "--json", "."], ["--json .", "is a directory"]),
        (["plan", "--budget", "40%", "--json", "/proc/x/p.json"], ["--json /proc/x/p.json"]),
        (["plan", "--budget", "40%", "--solver", "magic"], ["--solver magic", "sqrt"]),
        (["plan", "--model", "resnet", "--budget", "40%"], ["'resnet'", "hf:<arch>"]),
    ],
)
def test_bad_arguments_exit_2_in_one_line_before_anything_runs(capsys, monkeypatch, argv, expected):
    import remat.bench.runner
    import remat.profiling.profiler

    def must_not_run(*args, **kwargs):
        raise AssertionError("a worker or the profile started")

    monkeypatch.setattr(remat.bench.runner, "WorkerProcess", must_not_run)
    monkeypatch.setattr(remat.profiling.profiler, "_profile", must_not_run)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"remat {argv[0]}: error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def _bench_children(pid: int) -> list[int]:
    """Worker processes of the ``remat bench`` process ``pid``."""
    import os

    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                command = f.read()
        except OSError:
            continue
        if parent == pid and "remat.bench.worker" in command:
            children.append(int(entry))
    return children


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_ends_bench_at_once_in_one_line_leaving_nothing_behind(tmp_path, signum):
    """Ctrl-C or SIGTERM mid-run: one line on stderr within 2 s, no orphan worker, no
    remat-bench-* temporary folder."""
    import os
    import signal
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # Ctrl-C at a terminal: SIGINT at its default in remat. A suite started in the
    # background of a non-interactive shell inherits SIGINT ignored, and passes that on.
    proc = subprocess.Popen(
        [sys.executable, "-m", "remat", "bench", *SMALL_GPT, "--steps", "50", "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while len(_bench_children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _bench_children(proc.pid)
    assert workers, "the workers never started"
    time.sleep(2)  # they are running steps now
    sent = time.monotonic()
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == (130 if signum == "SIGINT" else 143)
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("remat bench: interrupted" if signum == "SIGINT" else "remat bench: term")
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("remat-bench-")]


def _help_examples(text: str) -> list[list[str]]:
    """The command lines under "examples:" in a --help text."""
    lines = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [
        line.strip().split("  ")[0].split()[1:]
        for line in lines
        if line.strip().startswith("remat")
    ]


def test_every_help_example_is_found():
    import remat.cli as cli

    examples = [
        e
        for epilog in (cli.MAIN_EPILOG, cli.BENCH_EPILOG, cli.PLAN_EPILOG, cli.FIT_EPILOG)
        for e in _help_examples(epilog)
    ]
    assert len(examples) >= 12 and ["plan", "--model", "gpt", "--budget", "40%"] in examples


HELP_EXAMPLES = sorted(
    {
        tuple(e)
        for epilog in ("MAIN_EPILOG", "BENCH_EPILOG", "PLAN_EPILOG", "FIT_EPILOG")
        for e in _help_examples(getattr(__import__("remat.cli").cli, epilog))
    }
)


@pytest.mark.slow
@pytest.mark.parametrize("argv", HELP_EXAMPLES, ids=" ".join)
def test_every_example_in_every_help_runs(argv, tmp_path, monkeypatch, capsys):
    """Each example does what its help says: exit 0, except the reentrant bug (1) and CUDA
    without a GPU (2, one line). The files they name are there: the example factory, a local
    config.json, and for plan:plan.json the plan the plan example writes."""
    monkeypatch.chdir(tmp_path)  # the examples write their JSON and plots here
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "08_my_model.py", tmp_path / "examples")
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    if "remat,plan:plan.json" in argv:
        model = argv[argv.index("--model") + 1]
        [make_plan] = [
            e for e in HELP_EXAMPLES if e[0] == "plan" and "plan.json" in e and model in e
        ]
        assert main(list(make_plan)) == 0
    code = main(list(argv))
    err = capsys.readouterr().err
    if "tutorial-reentrant" in argv:
        assert code == 1 and "tutorial-reentrant: FAIL" in err
    elif "cuda" in argv and not torch.cuda.is_available():
        assert code == 2 and "no CUDA GPU" in err
    else:
        assert code == 0, err
