"""remat.autoplan's answers a user can act on (issue #26): mistakes told before the
profile's minutes, a budget the model already fits, what bounds a budget that nothing
fits, and a result that prints in a few lines."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import remat
from conftest import mean_square, tiny_gpt
from remat.profiling.step import measure_step_peak
from remat.solver import min_peak_bytes
from remat.solver.budget import describe_bytes
from remat.solver.units import fmt_bytes

SIZES = dict(n_layers=4, seq_len=32, d_model=32, vocab_size=32)


@pytest.fixture(scope="module")
def profiled():
    workload = tiny_gpt(**SIZES)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=mean_square, repeats=1)
    return workload, prof


def autoplan_of(workload, **options):
    options = {"loss_fn": mean_square, **options}
    return lambda: remat.autoplan(workload.model, *workload.inputs, **options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"budget": 0.5}, ValueError, r"budget 0.5: .*did you mean 50%\?"),
        ({"budget": "0.5"}, ValueError, r"budget 0.5: .*did you mean 50%\?"),
        ({"budget": 40}, ValueError, r"budget 40: 40 bytes fit no model; did you mean 40%\?"),
        ({"budget": "40"}, ValueError, r"did you mean 40%\?"),
        ({"budget": "half"}, ValueError, r"budget 'half' does not parse"),
        ({"budget": 0}, ValueError, r"budget must be a positive number of bytes, got 0"),
        ({"budget": "-1GB"}, ValueError, r"budget '-1GB' does not parse"),
        ({"budget": None}, TypeError, r"budget must be bytes .* got NoneType None"),
        ({"budget": "50%", "solver": "magic"}, ValueError, r"solver='magic' is not one of"),
        ({"budget": "50%", "solver": 2}, TypeError, r"solver must be a str"),
        ({"budget": "50%", "max_rounds": 0}, ValueError, r"max_rounds must be a positive int"),
        ({"budget": "50%", "max_rounds": "3"}, TypeError, r"max_rounds must be an int, got '3'"),
        ({"budget": "50%", "loss_fn": "mse"}, TypeError, r"loss_fn must be a callable"),
        ({"budget": "50%", "profile": {}}, TypeError, r"profile must be a remat.Profile"),
    ],
)
def test_a_mistake_is_told_at_once_naming_autoplan_and_the_argument(options, error, match):
    workload = tiny_gpt(**SIZES)
    start = time.perf_counter()
    with pytest.raises(error, match=rf"^remat.autoplan: .*{match}"):
        autoplan_of(workload, **options)()
    assert time.perf_counter() - start < 2.0  # before: the profile's seconds, then the error


def test_a_model_in_eval_mode_is_refused_at_once():
    workload = tiny_gpt(**SIZES)
    workload.model.eval()
    start = time.perf_counter()
    with pytest.raises(remat.PlanError, match="remat.autoplan: GPT is in eval mode"):
        autoplan_of(workload, budget="50%")()
    assert time.perf_counter() - start < 2.0


def _assert_meta_refused(call):
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        call()
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert message.startswith("remat.autoplan: ") and "meta device" in message
    assert "measures each plan by running the model" in message
    assert 'remat.profile(model, ..., target_device="h100")' in message
    assert "remat.plan(prof, budget)" in message


def test_a_model_on_meta_is_refused_at_once_pointing_to_profile_and_plan():
    workload = tiny_gpt(device="meta", **SIZES)
    _assert_meta_refused(autoplan_of(workload, budget="50%"))
    # what the message advises works on the same model
    prof = remat.profile(
        workload.model, *workload.inputs, loss_fn=mean_square, target_device="h100"
    )
    assert remat.plan(prof, "100%").regions


def test_a_transformers_model_on_meta_is_refused_at_once():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    # before: "Tensor.item() cannot be called on meta tensors", deep inside transformers
    _assert_meta_refused(lambda: remat.autoplan(model, input_ids=ids, labels=ids, budget="50%"))


def test_a_budget_the_step_already_fits_checkpoints_nothing_and_says_so(profiled):
    workload, prof = profiled
    n = len(prof.regions)
    remat.apply_plan(workload.model, remat.plan_from_choices(prof, ["recompute"] * n))
    assert remat.applied(workload.model)  # an earlier plan, which must go
    for budget in ("100%", 10 * prof.step_peak_bytes):
        with pytest.warns(UserWarning, match="remat.autoplan: nothing to checkpoint") as caught:
            result = autoplan_of(workload, budget=budget, profile=prof)()
        message = str(caught[0].message)
        assert f"peak {describe_bytes(prof.step_peak_bytes)} fits the budget" in message
        assert remat.applied(workload.model) == {}
        assert [r.action for r in result.plan.regions] == ["store"] * n
        assert not result.plan.segments and result.plan.extra_cost == 0
        assert result.rounds == 1
        assert result.budget_bytes == remat.parse_budget(
            budget, baseline_bytes=prof.step_peak_bytes
        )
        measured = measure_step_peak(workload.model, workload.inputs, mean_square)
        assert result.measured_peak_bytes == measured == prof.step_peak_bytes
        assert "(nothing checkpointed)" in str(result)


def test_a_budget_nothing_fits_says_what_bounds_it(profiled):
    workload, prof = profiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nothing to checkpoint" here
        with pytest.raises(remat.BudgetError) as err:
            autoplan_of(workload, budget="30%", profile=prof, max_rounds=3)()
    message = str(err.value)
    floor = prof.step_peak_for(min_peak_bytes(prof.to_chain()))
    assert message.startswith("remat.autoplan: no plan measured within the budget ")
    assert "the lowest peak measured was " in message
    assert f"the head and loss alone need {fmt_bytes(prof.tail_bytes)} after them" in message
    assert (
        f"No checkpointing of the blocks (4 regions) goes below "
        f"{describe_bytes(floor, prof.step_peak_bytes)}, predicted" in message
    )
    assert f"the step peaks at {fmt_bytes(prof.unplannable_bytes)} before" in message
    budget = remat.parse_budget("30%", baseline_bytes=prof.step_peak_bytes)
    assert floor > budget and err.value.min_feasible_bytes > budget
    assert remat.applied(workload.model) == {}  # no plan left on it
    # the lowest peak measured is a budget that fits, measured
    result = autoplan_of(workload, budget=err.value.min_feasible_bytes, profile=prof)()
    assert result.measured_peak_bytes <= err.value.min_feasible_bytes


def test_autoplan_prints_in_a_few_lines_and_its_repr_leaves_the_profile_out(profiled):
    workload, prof = profiled
    result = autoplan_of(workload, budget="70%", profile=prof)()
    text = str(result)
    assert len(text) < 400 and text.count("\n") < 4, text
    assert prof.regions[0].name not in text  # neither the profile nor the plan's table
    assert f"measured peak {fmt_bytes(result.measured_peak_bytes)}" in text
    assert f"budget {fmt_bytes(result.budget_bytes)}" in text
    assert f"predicted {fmt_bytes(result.plan.predicted_peak_bytes)}" in text
    assert f"{result.rounds} round(s)" in text
    assert "Profile(" not in repr(result) and "profile=" not in repr(result)
    assert "measured_peak_bytes=" in repr(result)


def test_autoplan_counts_what_each_region_does(profiled):
    _, prof = profiled
    plan = remat.plan_from_choices(prof, ["store", "recompute", "recompute", "store"], [(0, 2)])
    result = remat.AutoPlan(
        plan=plan, profile=prof, budget_bytes=10**6, measured_peak_bytes=123_456, rounds=2
    )
    text = str(result)
    assert "2 stored, 2 recomputed, 0 op-level, 0 offloaded; 1 multi-region segment(s)" in text
    assert "measured peak 123.46 kB within the budget 1.00 MB" in text and "2 round(s)" in text
    assert "nothing checkpointed" not in text
