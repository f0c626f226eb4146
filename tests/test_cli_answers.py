"""remat plan and remat fit answer in the user's units: a verdict, errors in the flag's
quantity with the changes that fit (each checked by running it), readable output."""

from __future__ import annotations

import json
import re
import time

import pytest

from remat.cli import main

# a small GPT on meta, planned for an H100 (predicted: nothing runs, a few seconds)
META_GPT = ["--model", "gpt", "--layers", "4", "--d-model", "256", "--heads", "4", "--seq-len"]
META_GPT += ["1024", "--batch", "8", "--dtype", "bfloat16", "--device", "meta", "--target", "h100"]


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *META_GPT, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _readable(text: str) -> None:
    assert max(map(len, text.splitlines())) <= 120, text
    assert not re.search(r"\de[+-]\d", text), text  # no scientific notation
    assert "GiB" not in text and "MiB" not in text


def test_a_plan_ends_in_a_verdict_per_device(capsys):
    code, out, _ = _plan(capsys, "--optimizer", "adamw", "--budget", "2GB")
    assert code == 0
    last = out.splitlines()[-1]
    assert re.fullmatch(r"fits: [\d.]+ [MG]B of 2\.00 GB per device \([\d.]+ [MG]B free, "
                        r"[\d.]+ [MG]B of it headroom\)", last), last  # fmt: skip
    # the default headroom for a GPU target is shown, and settable
    assert "headroom 600.00 MB" in out  # 0.5 GB CUDA context + 5% of 2 GB
    code, out, _ = _plan(capsys, "--optimizer", "adamw", "--budget", "2GB", "--headroom", "0")
    assert code == 0 and "headroom" not in out.splitlines()[-1]
    _readable(out)


def test_a_step_budget_ends_in_its_own_verdict(capsys):
    code, out, _ = _plan(capsys, "--budget", "60%")
    assert code == 0 and out.splitlines()[-1].startswith("fits: the step peaks at ")
    assert "within --budget 60% = " in out.splitlines()[-1]
    _readable(out)


def test_a_budget_too_small_names_the_budget_it_needs_and_that_budget_fits(capsys):
    code, _, err = _plan(capsys, "--optimizer", "adamw", "--budget", "600MB")
    assert code == 1
    needed = re.search(r"needs --budget >= ([\d.]+ [MG]B)", err)
    assert needed, err
    # in the flag's quantity: the budget it names is enough, to the figure printed
    budget = needed.group(1).replace(" ", "")
    code, out, err = _plan(capsys, "--optimizer", "adamw", "--budget", budget)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("fits: ")


def test_the_changes_it_names_fit(capsys):
    argv = ["--optimizer", "adamw", "--budget", "1.2GB", "--world-size", "2"]
    code, _, err = _plan(capsys, *argv)
    assert code == 1 and "cheapest changes: " in err, err
    ranks = re.search(r"--world-size (\d+) \(", err)
    seq = re.search(r"--seq-len (\d+) \(", err)
    assert ranks and seq, err
    more = [a if a != "2" else ranks.group(1) for a in argv]
    assert _plan(capsys, *more)[0] == 0
    shorter = [*argv]
    shorter[-1] = "2"
    code = main(["plan", *META_GPT[:-10], "--seq-len", seq.group(1), *META_GPT[-8:], *shorter])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--model", "gpt", "--budget", "0.5"], "--budget"),
        (["fit", "--model", "gpt", "--seq-len", "many"], "--seq-len many"),
        (["fit", "--model", "mlp", "--seq-len", "auto", "--budget", "1GB"], "--seq-len auto"),
        (["fit", "--model", "gpt", "--device", "meta"], "--target"),
        (["fit", "--model", "gpt", "--target", "h100", "--optimizer", "lion"], "--optimizer lion"),
        (["plan", "--model", "gpt", "--budget", "1GB", "--headroom", "1GB"], "--headroom"),
    ],
)
def test_bad_arguments_fail_in_under_two_seconds(capsys, argv, expected):
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_fit_prints_a_table_and_writes_its_rows(tmp_path, capsys):
    js = tmp_path / "fit.json"
    argv = ["fit", *META_GPT[:-4], "--target", "h100", "--world-size", "8", "--json", str(js)]
    argv.remove("--batch")
    argv.remove("8")
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    _readable(out)
    doc = json.loads(js.read_text())
    best = doc["best"]
    assert f"largest that fits: batch {best['batch']} x 1024" in out
    rows = {(r["batch"], r["plan"]): r for r in doc["rows"]}
    assert rows[(best["batch"], "remat")]["fits"]
    assert not rows[(best["batch"] + 1, "remat")]["fits"]  # the next batch was profiled
    assert {"none", "full", "selective", "remat"} == {r["plan"] for r in doc["rows"]}


def test_every_plan_says_its_budget_as_torch_compile_s(capsys):
    code, out, _ = _plan(capsys, "--budget", "60%")
    share = re.search(r"as torch.compile's activation_memory_budget: ([\d.]+) ", out)
    assert code == 0 and share and 0 < float(share.group(1)) < 1, out


def test_compile_needs_a_real_device(capsys):
    code, _, err = _plan(capsys, "--budget", "60%", "--compile")
    assert code == 2 and "--compile measures each plan compiled" in err


@pytest.mark.slow
def test_compile_plans_by_measuring_compiled_steps(capsys):
    argv = ["plan", "--model", "gpt", "--layers", "3", "--d-model", "64", "--heads", "4"]
    code = main([*argv, "--seq-len", "64", "--device", "cpu", "--budget", "60%", "--compile"])
    out, _ = capsys.readouterr()
    assert code == 0, out
    measured = re.search(r"compiled: the step measures ([\d.]+) ([kMG])B under torch.compile, "
                         r"within --budget 60% = ([\d.]+) ([kMG])B", out)  # fmt: skip
    assert measured, out
    unit = {"k": 1e3, "M": 1e6, "G": 1e9}
    peak, budget = (float(measured.group(i)) * unit[measured.group(i + 1)] for i in (1, 3))
    assert peak <= budget
