"""Planning for a device this machine does not have: the roofline cost model, the targets
table, ``remat.profile(..., target_device=)`` on meta and on CPU, the training state in a budget."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import remat
from remat.bench.workloads import build_workload
from remat.cli import main
from remat.planner.training_state import training_state
from remat.targets.devices import TARGETS, Target, get_target, op_flops


def test_an_op_takes_the_slower_of_compute_and_memory_plus_its_launch():
    t = Target(name="t", flops_per_s={"float32": 1e12, "bfloat16": 4e12},
               memory_bandwidth=1e9, memory_bytes=10**9, launch_s=1e-6)  # fmt: skip
    assert t.op_seconds(4e12, 0, torch.bfloat16) == pytest.approx(1 + 1e-6)  # compute-bound
    assert t.op_seconds(1e6, 2e9, torch.float32) == pytest.approx(2 + 1e-6)  # memory-bound
    assert t.peak_flops(torch.float64) == 1e12  # not listed: the float32 rate


def test_every_target_has_its_source_and_sane_figures():
    for t in TARGETS.values():
        assert t.source and t.memory_bytes >= 24 * 10**9
        # tensor cores: half precision at least twice float32's rate
        assert t.flops_per_s["bfloat16"] >= 2 * t.flops_per_s["float32"]
    assert get_target("h100") is TARGETS["h100"] and get_target(TARGETS["l4"]) is TARGETS["l4"]
    cpu = get_target("cpu")  # measured here
    assert cpu.flops_per_s["float32"] > 1e8 and cpu.memory_bandwidth > 1e8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flops_per_s": {}}, "positive rates"),
        ({"flops_per_s": {"bfloat16": 1e12}}, "'float32' rate"),
        ({"memory_bandwidth": 0}, "must be positive"),
    ],
)
def test_a_bad_target_is_refused(kwargs, match):
    fields = {"name": "x", "flops_per_s": {"float32": 1.0}, "memory_bandwidth": 1.0,
              "memory_bytes": 1, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        Target(**fields)
    with pytest.raises(ValueError, match="known targets: h100"):
        get_target("b9000")


def test_attention_flops_are_counted_on_every_kernel():
    q = k = v = torch.randn(2, 4, 16, 8)
    math = 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q @ k^T and weights @ v
    flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert op_flops(flash_cpu, (q, k, v), {}, None) == math
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert op_flops(torch.ops.aten.mm.default, (a, b), {}, a @ b) == 2 * 5 * 7 * 3
    assert op_flops(torch.ops.aten.relu.default, (a,), {}, a.relu()) == 0


@pytest.mark.parametrize("model", ["mlp", "convnet"])
def test_meta_and_cpu_profiles_for_a_target_agree_to_the_byte_and_the_second(model):
    """Predicted costs depend on shapes only, so the meta profile is the CPU one."""
    cpu, meta = (build_workload(model, batch=16, device=d) for d in ("cpu", "meta"))
    a, b = (
        remat.profile(w.model, *w.inputs, loss_fn=w.loss_of, target_device="h100")
        for w in (cpu, meta)
    )
    assert a.meta["target"] == b.meta["target"] == "h100" and a.cost_unit == "seconds"
    fields = ("input_bytes", "saved_bytes", "output_bytes", "transient_bytes", "input_saved")
    for ra, rb in zip(a.regions, b.regions, strict=True):
        assert [getattr(ra, f) for f in fields] == [getattr(rb, f) for f in fields], ra.name
        assert ra.cost == pytest.approx(rb.cost) and ra.cost == pytest.approx(
            sum(o.cost for o in ra.ops)
        )
    assert (a.step_peak_bytes, a.tail_bytes) == (b.step_peak_bytes, b.tail_bytes)


def test_a_linear_costs_its_roofline_time_on_the_target():
    layer = nn.Sequential(nn.Linear(3000, 512), nn.Linear(512, 10)).to("meta")
    x = torch.empty(64, 3000, device="meta")
    h100 = TARGETS["h100"]
    prof = remat.profile(layer, x, target_device=h100)
    flops = 2 * 64 * 3000 * 512
    moved = 4 * (64 * 3000 + 512 * 3000 + 512 + 64 * 512)  # x, weight, bias, output
    expected = max(flops / h100.flops_per_s["float32"], moved / h100.memory_bandwidth)
    addmm = [o for o in prof.regions[0].ops if o.name.startswith("aten.addmm")]
    assert [o.cost for o in addmm] == [pytest.approx(expected + h100.launch_s)]


def test_training_state_counts_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10)).to(torch.bfloat16)
    model[0].requires_grad_(False)  # frozen, as a LoRA base
    state = training_state(model, "adamw")
    assert state.parameters == 2 * 110 * 2
    assert state.master_weights == 110 * 4 and state.optimizer_state == 110 * 8
    assert state.total == 440 + 440 + 880
    assert training_state(model.float(), "sgd").total == 2 * 110 * 4
    with pytest.raises(ValueError, match="known: adamw"):
        training_state(model, "lion")


def test_plan_for_a_target_on_meta_with_the_training_state(capsys):
    argv = ["plan", "--model", "gpt", "--layers", "4", "--device", "meta", "--target", "l4"]
    state = ["--dtype", "bfloat16", "--optimizer", "adamw", "--budget", "400MB", "--headroom", "0"]
    assert main([*argv, *state]) == 0
    out = capsys.readouterr().out
    assert "predicted on l4" in out and "training state (adamw)" in out
    assert "step time on l4: " in out and "over no checkpointing" in out
    verdict = re.search(r"fits: ([\d.]+) MB of 400\.00 MB per device", out)
    assert verdict and float(verdict.group(1)) <= 400, out
    assert main(["plan", "--target", "list"]) == 0
    assert "h100" in capsys.readouterr().out


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, *, target):
        for layer in self.layers:
            x = layer(x).tanh()
        return (x - target).square().mean()


def test_a_model_input_named_target_is_the_models():
    """``target_device`` is the option, so a model's own ``target=`` input reaches it."""
    model, x, y = _Regression(), torch.randn(4, 8), torch.randn(4, 8)
    prof = remat.profile(model, x, target=y, target_device="a100")
    assert prof.meta["target"] == "a100" and len(prof.regions) == 3
