"""Plans under torch.compile: every kind of region compiles without a graph break inside it,
gives the eager model's losses, gradients and buffers (to float rounding: Inductor fuses and
reorders float math), and updates buffers once."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import remat
from conftest import NEEDS_COMPILER, tiny_gpt
from remat import compile as remat_compile
from remat.policy.compiling import compiled_step_peak

pytestmark = [pytest.mark.slow, NEEDS_COMPILER, pytest.mark.usefixtures("fresh_dynamo")]

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
STEPS = 2


def train(model, loss_of, seed: int = 3):
    """Losses, gradients and buffers of STEPS steps (no optimizer: same weights each step)."""
    losses, grads = [], []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed + step)
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    return losses, grads, [b.clone() for b in model.buffers()]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


GPT_PLANS = {
    "recompute": {"choices": ["recompute"] * 4},
    "op-level": {"choices": ["save-matmuls", "store", "save-matmuls", "recompute"]},
    "segments": {"choices": ["recompute"] * 4, "segments": [(0, 2)]},
    "mixed": {"choices": ["store", "save-matmuls", "recompute", "store"], "segments": [(2, 4)]},
}


@pytest.fixture(scope="module")
def gpt_profile():
    workload = tiny_gpt(n_layers=4, dropout=0.1)
    prof = remat.profile(
        workload.model, *workload.inputs, loss_fn=lambda o: workload.loss_fn(o, workload.targets)
    )
    return workload, prof


@pytest.mark.parametrize("case", sorted(GPT_PLANS))
def test_gpt_plans_compile_whole_and_train_as_eager(gpt_profile, case):
    workload, prof = gpt_profile
    plan = remat.plan_from_choices(prof, every_preset=True, **GPT_PLANS[case])
    model = copy.deepcopy(workload.model)
    remat.apply_plan(model, plan)

    def loss_of(m):
        return workload.loss_fn(m(*workload.inputs), workload.targets)

    expected = train(copy.deepcopy(workload.model), loss_of)
    got = train(remat_compile(model), loss_of)
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, expected, **CLOSE)


def test_offloaded_region_under_compile_trains_as_eager(gpt_profile):
    """Offloading's saved-tensor hooks are not traced: the region runs eagerly inside the
    compiled model (graph breaks), with the eager model's gradients."""
    workload, prof = gpt_profile
    prof = dataclasses.replace(prof, host_bandwidth=1e12)
    plan = remat.plan_from_choices(prof, ["offload", "store", "recompute", "store"])
    model = copy.deepcopy(workload.model)
    remat.apply_plan(model, plan, offload_store=remat.CpuStore())

    def loss_of(m):
        return workload.loss_fn(m(*workload.inputs), workload.targets)

    expected = train(copy.deepcopy(workload.model), loss_of)
    torch.testing.assert_close(train(remat_compile(model), loss_of), expected, **CLOSE)


def test_transformers_llama_plan_compiles_without_a_break():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 128, (2, 32))
    prof = remat.profile(model, input_ids=ids, labels=ids)
    plan = remat.plan_from_choices(prof, ["recompute", "save-matmuls", "store"], every_preset=True)
    planned = copy.deepcopy(model)
    remat.apply_plan(planned, plan)

    def loss_of(m):
        return m(input_ids=ids, labels=ids).loss

    expected = train(model, loss_of)
    got = train(remat_compile(planned), loss_of)
    assert graph_breaks() == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got, expected, **CLOSE)


class _Normed(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(d, d), nn.BatchNorm1d(d)

    def forward(self, x):
        return torch.relu(self.norm(self.linear(x)))


@pytest.mark.parametrize("engine", ["hooks", "function"])
def test_batchnorm_statistics_updated_once_under_compile(engine):
    """The compiled forward updates running statistics once (buffers are functionalized);
    the recomputation in the compiled backward reads what the forward read."""
    torch.manual_seed(0)
    model = nn.Sequential(_Normed(16), _Normed(16), nn.Linear(16, 4))
    x = torch.randn(32, 16)
    planned = copy.deepcopy(model)
    remat.apply(planned, remat.by_type(_Normed) & remat.recompute(engine=engine))

    def loss_of(m):
        return m(x).square().mean()

    expected = train(model, loss_of)
    got = train(remat_compile(planned), loss_of)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert [b.item() for b in planned.buffers() if b.dim() == 0] == [STEPS, STEPS]


def test_compiled_step_peak_sees_the_plan(gpt_profile):
    """The compiled peak of a recomputing plan is below the compiled model's without one."""
    workload, prof = gpt_profile

    def loss_of(out):
        return workload.loss_fn(out, workload.targets)

    stored = compiled_step_peak(copy.deepcopy(workload.model), workload.inputs, loss_of)
    model = copy.deepcopy(workload.model)
    remat.apply_plan(model, remat.plan_from_choices(prof, ["recompute"] * 4))
    assert compiled_step_peak(model, workload.inputs, loss_of) < stored


def test_autoplan_for_compile_holds_its_budget_measured_compiled():
    """autoplan(compile=True): the percentage is of the compiled peak without recomputation,
    and the chosen plan's compiled peak, measured again, is within the budget."""
    workload = tiny_gpt(n_layers=4, seq_len=64, d_model=64, dropout=0.1)
    model = copy.deepcopy(workload.model)

    def loss_of(out):
        return workload.loss_fn(out, workload.targets)

    result = remat.autoplan(model, *workload.inputs, budget="60%", loss_fn=loss_of, compile=True)
    stored = copy.deepcopy(workload.model)
    baseline = compiled_step_peak(stored, workload.inputs, loss_of)
    assert result.compiled and result.budget_bytes == int(0.6 * baseline)
    assert result.measured_peak_bytes <= result.budget_bytes
    assert compiled_step_peak(model, workload.inputs, loss_of) == result.measured_peak_bytes
    assert 0 < result.activation_share < 1
    assert "activation_memory_budget=" in str(result)
