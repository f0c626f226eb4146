"""remat.bench: configurations, gradient comparison, and real runs with worker processes.

The oracles: exact bytes and FLOPs derived from the tutorial MLP's shapes (3000->512->700,
700->512->700, 700->512->10, float32), gradients against the un-checkpointed model.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import remat
from remat.bench.runner import (
    CONFIGS,
    SCHEMA,
    BenchOptions,
    ConfigResult,
    Environment,
    compare_grads,
    default_config_names,
    parse_configs,
    policy_config,
    run_bench,
)
from remat.bench.worker import classify, downsample, flop_counter
from remat.bench.workloads import build_workload

GOOD = ["tutorial", "tutorial-function", "remat", "per-block", "all-blocks"]
B = 16  # batch of the real runs: small, so weights dominate and workers start fast


def _grads(config: str, model: str = "mlp", **kw) -> tuple[torch.Tensor, dict]:
    w = build_workload(model, **kw)
    CONFIGS[config].apply(w, None)
    torch.manual_seed(0)
    loss = w.loss()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in w.model.named_parameters()}
    return loss.detach(), grads


# ---- configuration registry ---------------------------------------------------------------


def test_default_configs_put_none_first_and_leave_out_the_bug_demo():
    assert default_config_names() == ["none", *GOOD]
    assert parse_configs(None) == ["none", *GOOD]
    assert parse_configs("remat, none,remat") == ["none", "remat"]


def test_unknown_config_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'nope'") as e:
        parse_configs("remat,nope")
    for name in [*GOOD, "none", "tutorial-reentrant"]:
        assert name in str(e.value)
    assert "_crash" not in str(e.value)  # test-only configurations stay hidden
    with pytest.raises(ValueError, match="takes no argument"):
        parse_configs("remat:40%")


def test_a_parameterised_policy_config_is_one_entry(monkeypatch):
    import remat

    seen = []

    def every_n(workload, arg):
        seen.append(arg)
        return remat.every(int(arg))

    config = policy_config("every-n", "every n-th block", every_n, takes_arg=True, hidden=True)
    monkeypatch.setitem(CONFIGS, "every-n", config)  # registered for this test only
    assert parse_configs("every-n:2") == ["none", "every-n:2"]
    w = build_workload("gpt", batch=2, n_layers=4, d_model=32, n_heads=2, seq_len=8)
    config.apply(w, "2")
    assert seen == ["2"]
    assert sorted(remat.applied(w.model)) == ["blocks.0", "blocks.2"]


@pytest.mark.parametrize("config", GOOD)
@pytest.mark.parametrize("model", ["mlp", "gpt", "convnet"])
def test_configs_keep_state_dict_keys_and_gradients(config, model):
    sizes = {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 8} if model == "gpt" else {}
    ref_loss, ref = _grads("none", model, batch=4, **sizes)
    w = build_workload(model, batch=4, **sizes)
    keys = list(w.model.state_dict())
    CONFIGS[config].apply(w, None)
    assert list(w.model.state_dict()) == keys
    loss, grads = _grads(config, model, batch=4, **sizes)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=name)


def test_reentrant_config_really_drops_the_block_gradients():
    # The tutorial's bug, for real: block1's input does not require grad, so reentrant
    # checkpointing returns an output without grad_fn and blocks 1-2 get no gradients.
    with pytest.warns(UserWarning, match="requires_grad"):
        _, grads = _grads("tutorial-reentrant", batch=4)
    assert grads["block1.0.weight"] is None and grads["block2.2.bias"] is None
    assert grads["block3.0.weight"] is not None


# ---- pieces of the worker --------------------------------------------------------------


@pytest.mark.parametrize("config", ["none", "tutorial", "remat"])
def test_flop_counter_equals_flopcountermode(config):
    def count(mode):
        w = build_workload("gpt", batch=2, n_layers=2, d_model=32, n_heads=2, seq_len=8)
        CONFIGS[config].apply(w, None)
        with mode as c:
            w.loss().backward()
        return c.get_total_flops()

    assert count(flop_counter()) == count(FlopCounterMode(display=False)) > 0


def test_flop_counter_works_where_flopcountermode_breaks():
    # FlopCounterMode's module tracking cannot run remat.CheckpointFunction's backward.
    w = build_workload("mlp", batch=2)
    CONFIGS["tutorial-function"].apply(w, None)
    with flop_counter() as c:
        w.loss().backward()
    per_row = 2 * (3000 * 512 + 512 * 700 + 700 * 512 + 512 * 700 + 700 * 512 + 512 * 10)
    # Forward, two matmuls per linear in backward (the first layer's input gets no grad),
    # and the forward of blocks 1-2 again.
    blocks12 = 2 * (3000 * 512 + 512 * 700 + 700 * 512 + 512 * 700)
    assert c.get_total_flops() == 2 * (3 * per_row - 2 * 3000 * 512 + blocks12)


def test_compare_grads_detects_differences_and_missing_gradients():
    g = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    ref = {"loss": torch.tensor(1.5), "grads": g}
    same = {"loss": torch.tensor(1.5), "grads": {k: v.clone() for k, v in g.items()}}
    assert compare_grads(ref, same) == (True, 0.0, 0.0, [])

    off = {"loss": torch.tensor(1.5), "grads": {"a": g["a"].clone(), "b": g["b"] + 0.25}}
    match, loss_diff, max_diff, mismatched = compare_grads(ref, off)
    assert not match and loss_diff == 0.0 and mismatched == ["b"]
    assert max_diff == pytest.approx(0.25)

    gone = {"loss": torch.tensor(1.5), "grads": {"a": g["a"].clone(), "b": None}}
    match, _, max_diff, mismatched = compare_grads(ref, gone)
    assert not match and mismatched == ["b"] and max_diff == g["b"].abs().max().item()

    wrong_loss = {"loss": torch.tensor(1.75), "grads": same["grads"]}
    assert compare_grads(ref, wrong_loss) == (False, 0.25, 0.0, [])


def test_downsample_keeps_every_peak_and_the_limit():
    points = [(i, (i * 7919) % 1000) for i in range(10_000)]
    small = downsample(points, limit=100)
    assert len(small) == 100
    chunk_peaks = [max(p[1] for p in points[i : i + 100]) for i in range(0, 10_000, 100)]
    assert [p[1] for p in small] == chunk_peaks
    assert downsample(points[:5]) == [list(p) for p in points[:5]]


def test_classify_allocator_failures_as_oom():
    with pytest.raises(RuntimeError) as e:
        torch.empty(1 << 62, dtype=torch.uint8)
    assert classify(e.value) == "oom"
    assert classify(ValueError("shape mismatch")) == "crashed"
    assert classify(remat.BudgetError("no plan fits", min_feasible_bytes=10)) == "infeasible"


# ---- real runs: one worker process per configuration ----------------------------------------


@pytest.fixture(scope="module")
def mlp_run():
    return run_bench(BenchOptions(model="mlp", batch=B, steps=2, warmup=1))


def test_run_bench_rows_and_reference(mlp_run):
    rows = {r.name: r for r in mlp_run.configs}
    assert list(rows) == ["none", *GOOD]
    assert mlp_run.failed == []
    for r in rows.values():
        assert r.status == "ok" and r.error is None and r.grads_match is True
        assert r.max_grad_diff == 0.0 and r.loss_diff == 0.0  # same CPU kernels, same order
        assert len(r.step_times_s) == 2 and r.median_step_s > 0
        assert r.timeline and 0 < r.backward_start < r.timeline[-1][0]
        assert r.forward_peak_bytes <= r.step_peak_bytes
        assert r.cuda_max_allocated_bytes is None  # cpu
    assert rows["none"].time_ratio == 1.0 and rows["none"].extra_flops == 0
    env = mlp_run.environment
    assert (env.model, env.batch, env.device, env.parameters) == ("mlp", B, "cpu", 2_977_666)


def test_run_bench_saved_bytes_and_flops_are_exact(mlp_run):
    rows = {r.name: r for r in mlp_run.configs}
    f32 = 4
    # Blocks 1-2 as one region (the tutorial's) keep only block 1's input: the ReLU output
    # inside each block (B x 512) and block 1's output, block 2's input (B x 700), are not
    # saved. Per block, block 2's input is kept as its checkpoint; all-blocks also drops
    # block3's ReLU output. Recomputation: the forward of blocks 1-2 once more (2 FLOPs per
    # multiply-add).
    blocks12 = 3000 * 512 + 512 * 700 + 700 * 512 + 512 * 700
    for name in ("tutorial", "tutorial-function", "remat", "per-block"):
        kept_input = 700 if name == "per-block" else 0
        assert (
            rows["none"].saved_bytes - rows[name].saved_bytes
            == B * (2 * 512 + 700 - kept_input) * f32
        )
        assert rows[name].extra_flops == 2 * B * blocks12
    assert rows["none"].saved_bytes - rows["all-blocks"].saved_bytes == 3 * B * 512 * f32


def test_json_has_every_figure_and_the_environment(mlp_run, tmp_path):
    path = tmp_path / "bench.json"
    mlp_run.write_json(str(path))
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA
    assert set(doc["environment"]) == set(Environment.__dataclass_fields__)
    assert doc["environment"]["torch_version"] == torch.__version__
    assert [c["name"] for c in doc["configs"]] == ["none", *GOOD]
    for row in doc["configs"]:
        assert set(row) == set(ConfigResult.__dataclass_fields__)
        assert isinstance(row["step_peak_bytes"], int) and isinstance(row["flops"], int)


def test_batchnorm_statistics_updated_twice_fail_the_row():
    # torch.utils.checkpoint reruns BatchNorm in recomputation: running stats move twice and
    # num_batches_tracked reads 2. remat replays buffers, so its row matches none.
    result = run_bench(
        BenchOptions(model="convnet", batch=2, steps=1, configs=["tutorial", "remat"])
    )
    rows = {r.name: r for r in result.configs}
    assert rows["remat"].status == "ok" and rows["remat"].buffers_match is True
    assert rows["remat"].max_buffer_diff == 0.0
    tutorial = rows["tutorial"]
    assert tutorial.status == "FAIL" and tutorial.grads_match is True
    assert tutorial.buffers_match is False and "buffers differ" in tutorial.error
    assert tutorial.max_buffer_diff == 1.0  # num_batches_tracked: 2 instead of 1
    assert result.failed == ["tutorial"]


@pytest.mark.slow
def test_crash_and_oom_are_reported_while_the_others_finish():
    result = run_bench(BenchOptions(model="mlp", batch=4, steps=1, configs=["_crash", "_oom"]))
    rows = {r.name: r for r in result.configs}
    assert rows["none"].status == "ok" and rows["none"].median_step_s > 0
    assert rows["_crash"].status == "crashed" and "SIGSEGV" in rows["_crash"].error
    assert rows["_oom"].status == "oom" and "can't allocate memory" in rows["_oom"].error
    assert rows["_oom"].step_peak_bytes is None and rows["_oom"].step_times_s == []
    assert result.failed == ["_crash"]  # out of memory is a result, not a failure


def test_bad_options_fail_before_any_worker_starts():
    with pytest.raises(ValueError, match="valid models: mlp, gpt, convnet"):
        run_bench(BenchOptions(model="resnet"))
    with pytest.raises(ValueError, match="valid dtypes"):
        run_bench(BenchOptions(dtype="int8"))
    with pytest.raises(ValueError, match="steps"):
        run_bench(BenchOptions(steps=0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_carry_the_allocator_figures():
    result = run_bench(
        BenchOptions(model="mlp", batch=B, steps=1, device="cuda", configs=["remat"])
    )
    assert result.environment.device == "cuda" and result.failed == []
    for r in result.configs:
        # The allocator rounds blocks up and holds workspaces: never below the exact count.
        assert r.cuda_max_allocated_bytes >= r.step_peak_bytes
        assert r.cuda_max_reserved_bytes >= r.cuda_max_allocated_bytes


def test_plot_from_json_with_a_crashed_row(mlp_run, tmp_path):
    from remat.bench.plots import plot_bench
    from remat.bench.runner import BenchResult

    doc = json.loads(json.dumps(mlp_run.to_dict()))  # through JSON, as a saved run is
    configs = [ConfigResult(**c) for c in doc["configs"]]
    configs.append(ConfigResult(name="_crash", status="crashed", error="worker killed by SIGSEGV"))
    result = BenchResult(environment=Environment(**doc["environment"]), configs=configs)
    plot_bench(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
