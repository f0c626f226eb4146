"""remat.verify_plan: a plan applied to a copy, its step measured, its gradients compared."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import remat
from conftest import tiny_gpt


@pytest.fixture(scope="module")
def planned():
    w = tiny_gpt(n_layers=3, dropout=0.1)
    prof = remat.profile(w.model, *w.inputs, loss_fn=w.loss_of, repeats=1, **w.kwargs)
    return w, remat.plan(prof, "80%")


def test_a_plan_measures_its_prediction_and_equal_gradients(planned):
    w, plan = planned
    assert any(c != "store" for c in plan.choices)  # something is checkpointed
    check = remat.verify_plan(w.model, plan, *w.inputs, loss_fn=w.loss_of, **w.kwargs)
    assert check.ok, str(check)
    assert check.measured_peak_bytes == plan.predicted_peak_bytes
    assert check.max_gradient_difference == 0.0  # dropout seeded alike: bitwise
    assert remat.applied(w.model) == {}  # the model itself is left as it was
    assert "within the budget" in str(check)


def test_a_step_over_the_budget_is_not_ok(planned):
    w, plan = planned
    tight = dataclasses.replace(plan, budget_bytes=plan.predicted_peak_bytes // 2)
    check = remat.verify_plan(w.model, tight, *w.inputs, loss_fn=w.loss_of, **w.kwargs)
    assert not check.within_budget and not check.ok
    assert "OVER the budget" in str(check)


def test_gradients_that_differ_are_named(planned):
    w, plan = planned
    calls = itertools.count(1)  # a loss that changes from call to call: no two steps agree

    def loss_fn(out):
        return out.square().mean() * next(calls)

    check = remat.verify_plan(w.model, plan, *w.inputs, loss_fn=loss_fn, **w.kwargs)
    assert not check.gradients_equal and not check.ok
    assert "loss" in check.mismatched and len(check.mismatched) > 1
    assert "DIFFER" in str(check)


def test_a_meta_model_is_refused_before_it_runs(planned):
    plan = planned[1]
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        remat.verify_plan(model, plan, torch.empty(2, 4, device="meta"))
