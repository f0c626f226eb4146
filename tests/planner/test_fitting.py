"""remat.fit: the largest batch that fits a device, checked by measuring it and the next."""

from __future__ import annotations

import pytest

import remat
from conftest import tiny_gpt
from remat.planner.device_budget import Headroom
from remat.planner.fitting import device_budget_for
from remat.profiling.step import measure_step_peak

SIZES = {"n_layers": 3, "seq_len": 32, "d_model": 32}


def build(batch: int, seq_len: int | None, device: str = "cpu"):
    w = tiny_gpt(batch=batch, device=device, **{**SIZES, "seq_len": seq_len or SIZES["seq_len"]})
    return w.model, w.inputs, w.kwargs, w.loss_of


def _measured_total(batch: int, plan_of, device_bytes: int) -> tuple[int, int]:
    """(measured peak on top of the state, what the budget leaves the step) at ``batch``,
    with the plan ``plan_of(profile, step_bytes)`` applied."""
    model, inputs, kwargs, loss_of = build(batch, None)
    prof = remat.profile(model, *inputs, loss_fn=loss_of, repeats=1, **kwargs)
    budget = device_budget_for(
        model, (inputs, kwargs), prof, "adamw", 1, device_bytes, headroom=Headroom()
    )
    remat.apply_plan(model, plan_of(prof, budget))
    measured = measure_step_peak(model, inputs, loss_of, **kwargs)
    return budget.total_for(measured), budget.device_bytes


@pytest.fixture(scope="module")
def found():
    # the un-checkpointed step of batch 2 and its state; a few batches more fit with a plan
    model, inputs, kwargs, loss_of = build(2, None)
    prof = remat.profile(model, *inputs, loss_fn=loss_of, repeats=1, **kwargs)
    state = device_budget_for(
        model, (inputs, kwargs), prof, "adamw", 1, 10**12, headroom=Headroom()
    )
    device_bytes = state.resident_bytes + 2 * prof.step_peak_bytes
    return remat.fit(build, device_bytes=device_bytes, seq_len=32), device_bytes


def test_the_largest_batch_measures_within_the_device_and_the_next_does_not(found):
    result, device_bytes = found
    best = result.best
    assert best is not None and best.plan == "remat" and best.fits and best.batch > 2
    plan = result.plans[(best.batch, 32)]
    total, _ = _measured_total(best.batch, lambda prof, budget: plan, device_bytes)
    assert total <= device_bytes  # the answer measures within the device
    assert total <= best.peak_bytes  # and within its prediction

    # the next batch, profiled by the search, fits with no plan: not even the least-memory one
    nxt = [r for r in result.rows if r.batch == best.batch + 1 and r.plan == "remat"]
    assert nxt and not nxt[0].fits

    def least(prof, budget):
        return remat.plan(prof, remat.planner.fitting.least_step_peak(prof))

    total_next, _ = _measured_total(best.batch + 1, least, device_bytes)
    assert total_next > device_bytes


def test_the_table_names_each_plan_and_the_answer(found):
    result, _ = found
    text = result.table()
    assert {"none", "full", "selective", "remat"} <= set(text.split())
    assert f"largest that fits: batch {result.best.batch} x 32 tokens" in text
    assert max(map(len, text.splitlines())) <= 120
    selective = [r for r in result.rows if r.plan == "selective"]
    assert selective and all(r.peak_bytes is not None for r in selective)  # on every size


def test_nothing_fits_says_so():
    result = remat.fit(build, device_bytes=10**5, optimizer="adamw")
    assert result.best is None and "nothing fits" in result.table()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lion"}, "optimizer"),
        ({"world_size": 0}, "world_size"),
        ({"batch": 0}, "batch"),
        ({}, "device_bytes"),
    ],
)
def test_bad_arguments_are_named_before_any_profile(kwargs, match):
    calls = []

    def counting(batch, seq_len):
        calls.append(batch)
        return build(batch, seq_len)

    options = {"device_bytes": 10**9, **kwargs} if match != "device_bytes" else {}
    with pytest.raises(ValueError, match=match):
        remat.fit(counting, **options)
    assert calls == []


def test_a_target_plans_on_meta_in_its_seconds():
    def on_meta(batch, seq_len):
        return build(batch, seq_len, device="meta")

    result = remat.fit(on_meta, target="h100", batch=1, seq_len=32, world_size=8)
    assert result.best is not None and result.best.step_seconds is not None
    assert result.headroom_bytes == 5 * 10**8 + 5 * 10**8 + 4 * 10**9  # context, NCCL, 5%
