"""Bad input to the public API: the exception type, and a message naming the argument and
the bad value (issue #14). The CLI's cases are in ``tests/test_cli.py``."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import remat
from conftest import tiny_gpt
from remat.solver import Chain, Region, plan_chain


def small():
    return tiny_gpt(seq_len=8, d_model=16, n_heads=2, vocab_size=32)


@pytest.fixture(scope="module")
def profile():
    w = small()
    return remat.profile(w.model, *w.inputs, repeats=1)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("1e999", r"budget '1e999' is not a finite number"),
        ("1e400%", r"budget '1e400%' is not a finite number"),
        ("1e400GiB", r"budget '1e400GiB' is not a finite number"),
        (float("inf"), r"positive number of bytes, got inf"),
    ],
)
def test_infinite_budgets_are_value_errors_naming_the_budget(budget, match):
    with pytest.raises(ValueError, match=match):
        remat.parse_budget(budget, baseline_bytes=1000)


def test_plan_budget_errors_name_sizes_in_mb_and_percent_and_suggest_a_percentage(profile):
    with pytest.raises(ValueError, match="budget '1e999' is not a finite number"):
        remat.plan(profile, "1e999")
    with pytest.raises(remat.BudgetError) as err:
        remat.plan(profile, 40)
    message = str(err.value)
    assert "40 B (40 B, 0% of the un-checkpointed step's peak)" in message
    assert "did you mean 40%?" in message
    assert " kB, " in message.split("smallest feasible budget is")[1]


def _plan_json() -> dict:
    chain = Chain(
        [Region(name=n, fwd_cost=1, input_bytes=4, saved_bytes=8, output_bytes=4) for n in "ab"]
    )
    return json.loads(plan_chain(chain, 100).to_json())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: [1, 2], r"plan must be a JSON object .* got list \[1, 2\]"),
        (lambda d: {k: v for k, v in d.items() if k != "regions"}, r"missing field\(s\) 'regions'"),
        (lambda d: {**d, "regions": [{"action": "store"}]}, r"regions\[0\]: missing .*'name'"),
        (lambda d: {**d, "regions": "ab"}, r"'regions' must be a non-empty list, got 'ab'"),
        (lambda d: {**d, "bogus": 1}, r"unknown field\(s\) 'bogus'"),
        (lambda d: {**d, "segments": [[0]]}, r"'segments' must be a list of \[start, stop\]"),
        (
            lambda d: {**d, "regions": [{**d["regions"][0], "action": "skip"}, d["regions"][1]]},
            r"region 'a': action must be one of .* got 'skip'",
        ),
        (
            lambda d: {**d, "regions": [{**d["regions"][0], "kept_bytes": -1}, d["regions"][1]]},
            r"kept_bytes must be a non-negative int of bytes, got -1",
        ),
    ],
)
def test_bad_plan_json_is_a_plan_error_naming_the_field(edit, match):
    with pytest.raises(remat.PlanError, match=match):
        remat.Plan.from_json(json.dumps(edit(_plan_json())))


def test_plan_json_that_is_not_json():
    with pytest.raises(remat.PlanError, match="not valid JSON"):
        remat.Plan.from_json("{regions")


@pytest.mark.parametrize("bad", ["profile.json", 3, {"regions": []}, None])
def test_wrong_types_to_plan_pareto_and_apply_plan_name_the_argument(bad, profile):
    with pytest.raises(TypeError, match=r"remat.plan: profile must be a remat.Profile"):
        remat.plan(bad, "50%")
    with pytest.raises(TypeError, match=r"remat.pareto: profile must be a remat.Profile"):
        remat.pareto(bad)
    with pytest.raises(TypeError, match=r"remat.apply_plan: plan must be a remat.Plan"):
        remat.apply_plan(small().model, bad)
    plan = remat.plan(profile, "100%")
    with pytest.raises(TypeError, match="remat.apply_plan: model must be an nn.Module"):
        remat.apply_plan(bad, plan)


def test_autoplan_profile_and_estimate_options_are_checked_up_front():
    w = small()
    with pytest.raises(ValueError, match="max_rounds must be a positive int, got 0"):
        remat.autoplan(w.model, *w.inputs, budget="50%", max_rounds=0)
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        remat.profile(w.model, *w.inputs, repeats=0)
    with pytest.raises(TypeError, match="repeats must be an int, got '3'"):
        remat.profile(w.model, *w.inputs, repeats="3")
    with pytest.raises(TypeError, match="loss_fn must be a callable .* got int 3"):
        remat.profile(w.model, *w.inputs, loss_fn=3)
    with pytest.raises(TypeError, match="loss_fn must be a callable .* got int 3"):
        remat.autoplan(w.model, *w.inputs, budget="50%", loss_fn=3)
    with pytest.raises(TypeError, match="regions must be a list of module names, got 'blocks.0'"):
        remat.profile(w.model, *w.inputs, regions="blocks.0")
    with pytest.raises(TypeError, match="checkpoint_modules must be .* got int 3"):
        remat.estimate(w.model, *w.inputs, checkpoint_modules=3)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        remat.estimate(w.model, *w.inputs, loss_fn="sum")


def test_policy_constructors_check_their_arguments():
    with pytest.raises(TypeError, match="offset must be an int, got '1'"):
        remat.every(2, offset="1")
    with pytest.raises(TypeError, match=r"where: predicate must be a .* function, got int 3"):
        remat.where(3)
    with pytest.raises(
        TypeError,
        match=r"save must be a list of op names, got the single 'mm' "
        r"\(did you mean save=\['mm'\]\?\)",
    ):
        remat.ops(save="mm")
    with pytest.raises(TypeError, match=r"recompute must be a list of op names"):
        remat.ops(recompute="mm")


def test_values_check_handles_sparse_saved_tensors():
    w = torch.randn(3, 4, requires_grad=True)
    index = torch.tensor([[0, 1, 2], [2, 0, 1]])
    sparse = torch.sparse_coo_tensor(index, torch.ones(3), (3, 3))
    y = remat.checkpoint(
        lambda w, s: torch.sparse.mm(s, w).tanh(), w, sparse, determinism_check="values"
    )
    y.sum().backward()
    expected = torch.autograd.grad(torch.sparse.mm(sparse, w).tanh().sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["replay", "tape"])
def test_a_model_with_ops_applied_saves_and_loads_with_torch_save(engine):
    model = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    remat.apply(model, remat.ops("save-matmuls", engine=engine))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert remat.applied(loaded) == remat.applied(model) == {"0": "ops", "1": "ops"}
    assert (
        loaded[0].__dict__["_remat_state"].treatments
        == model[0].__dict__["_remat_state"].treatments
    )
