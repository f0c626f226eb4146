"""Planner data: validation, the memory model on a hand-worked chain, JSON, budgets, dispatch."""

from __future__ import annotations

import dataclasses
import json

import pytest

from remat.errors import BudgetError, PlanError
from remat.solver import (
    SOLVERS,
    Chain,
    Plan,
    Region,
    RegionOption,
    RegionPlan,
    evaluate,
    parse_budget,
    plan_chain,
    plan_from_choices,
    store_all_peak,
)


def three() -> Chain:
    return Chain(
        [
            Region(
                name="a",
                fwd_cost=1,
                input_bytes=2,
                saved_bytes=10,
                output_bytes=3,
                transient_bytes=1,
            ),
            Region(
                name="b",
                fwd_cost=2,
                input_bytes=3,
                saved_bytes=8,
                output_bytes=2,
                options=(
                    RegionOption(
                        name="keep-mm", kept_bytes=5, recompute_cost=0.5, save_ops=("mm",)
                    ),
                ),
            ),
            Region(name="c", fwd_cost=4, input_bytes=2, saved_bytes=6, output_bytes=1),
        ]
    )


def test_memory_model_on_a_hand_worked_chain():
    chain = three()
    # backward_bytes: a 10+3+1=14, b 8+2=10, c 6+1=7.
    # All stored: c's backward runs with a and b held: 10 + 8 + 7 = 25.
    plan = plan_from_choices(chain, ["store", "store", "store"])
    assert (plan.predicted_peak_bytes, plan.extra_cost) == (25, 0)
    assert store_all_peak(chain) == 25
    # a recomputed: it holds its input (2): max(14, 2 + 10, 2 + 8 + 7) = 17, cost 1.
    plan = plan_from_choices(chain, ["recompute", "store", "store"])
    assert (plan.predicted_peak_bytes, plan.extra_cost) == (17, 1)
    # b op-level (keeps 5, costs 0.5): max(14, 10 + 10, 10 + 5 + 7) = 22.
    plan = plan_from_choices(chain, ["store", "keep-mm", "store"])
    assert (plan.predicted_peak_bytes, plan.extra_cost) == (22, 0.5)
    assert plan.regions[1].action == "ops" and plan.regions[1].save_ops == ("mm",)
    # Segment [a, b) holding a's input: forward a 2+3+1=6, b 2+3+2=7; c: 2 + 7 = 9;
    # then the segment reruns stored while the gradient of b's output (2) waits through its
    # forward: a 2 + 14 = 16, b 10 + 2 + 10 = 22. Cost: a and b once more.
    plan = plan_from_choices(chain, ["store", "store", "store"], [(0, 2)])
    assert (plan.predicted_peak_bytes, plan.extra_cost) == (22, 3)
    assert [r.depth for r in plan.regions] == [1, 1, 0]


def test_region_and_chain_validation_name_the_field():
    ok = {"name": "x", "fwd_cost": 1, "input_bytes": 4, "saved_bytes": 8, "output_bytes": 4}
    with pytest.raises(ValueError, match="saved_bytes"):
        Region(**{**ok, "saved_bytes": 2})
    with pytest.raises(ValueError, match="input_bytes"):
        Region(**{**ok, "input_bytes": -1})
    with pytest.raises(ValueError, match="fwd_cost"):
        Region(**{**ok, "fwd_cost": float("nan")})
    with pytest.raises(ValueError, match="transient_bytes"):
        Region(**{**ok, "transient_bytes": 1.5})
    with pytest.raises(ValueError, match="outside"):
        Region(**ok, options=(RegionOption(name="o", kept_bytes=9, recompute_cost=1),))
    with pytest.raises(ValueError, match="duplicate option"):
        Region(**ok, options=(RegionOption(name="store", kept_bytes=5, recompute_cost=1),))
    with pytest.raises(ValueError, match="recompute_cost .* more than the forward"):
        Region(**ok, recompute_cost=1.5)
    with pytest.raises(ValueError, match="duplicate region name 'x'"):
        Chain([Region(**ok), Region(**ok)])
    with pytest.raises(ValueError, match="empty"):
        Chain([])
    with pytest.raises(TypeError, match="Region"):
        Chain([object()])


def test_plan_validation():
    chain = three()
    with pytest.raises(ValueError, match="3 entries"):
        plan_from_choices(chain, ["store"])
    with pytest.raises(ValueError, match="no option 'nope'"):
        plan_from_choices(chain, ["store", "nope", "store"])
    with pytest.raises(ValueError, match="segments"):
        plan_from_choices(chain, [0, 0, 0], [(0, 1)])
    with pytest.raises(ValueError, match="overlap"):
        plan_from_choices(chain, [0, 0, 0], [(0, 2), (1, 3)])


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        ([[0, 2], [0, 2]], r"\(0, 2\)\] listed more than once"),  # would run blocks twice
        ([[2, 1]], r"\(2, 1\) must satisfy"),
        ([[0, 99]], r"\(0, 99\) must satisfy .* <= 3"),
        ([[0, 2], [1, 3]], "overlap without nesting"),
    ],
)
def test_edited_plan_segments_are_validated_on_load(segments, match):
    data = json.loads(plan_chain(three(), 20).to_json())
    data["segments"] = segments
    with pytest.raises(PlanError, match=match):
        Plan.from_json(json.dumps(data))


def test_json_round_trips():
    chain = three()
    assert Chain.from_json(chain.to_json()) == chain
    plan = plan_chain(chain, 20)
    again = Plan.from_json(plan.to_json(indent=2))
    assert again == plan
    assert evaluate(chain, again) == (plan.predicted_peak_bytes, plan.extra_cost)
    data = json.loads(plan.to_json())
    assert data["solver"] == "chain" and data["budget_bytes"] == 20
    nested = plan_from_choices(chain, [0, 0, 0], [(0, 2)], solver="manual")
    assert Plan.from_json(nested.to_json()) == nested
    with pytest.raises(ValueError, match="do not match"):
        evaluate(Chain(chain.regions[:2]), again)


def test_plan_prints_a_table():
    plan = plan_from_choices(
        three(), ["recompute", "keep-mm", "store"], budget_bytes=30, solver="x"
    )
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].startswith("Plan by x: predicted peak 14 B (budget 30 B)")
    assert lines[1].split() == ["#", "region", "treatment", "kept", "recompute"]  # no empty column
    assert lines[3].split()[:4] == ["1", "b", "keep-mm", "(replay)"]
    assert "%" in lines[2] and "MiB" not in text and "e+" not in text
    tape = dataclasses.replace(plan.regions[1], engine="tape")
    tape_plan = dataclasses.replace(plan, regions=(plan.regions[0], tape, plan.regions[2]))
    assert str(tape_plan).splitlines()[3].split()[2:4] == ["keep-mm", "(tape)"]
    # a knapsack option is named by what it keeps; verbose lists the ops by their short names
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu.default#0"
    kept = dataclasses.replace(tape, option="ops7", save_ops=(sdpa, "aten.addmm.default#1"))
    kept_plan = dataclasses.replace(plan, regions=(plan.regions[0], kept, plan.regions[2]))
    assert "keep 2 op outputs (tape)" in str(kept_plan).splitlines()[3]
    verbose = kept_plan.table(verbose=True).splitlines()
    assert verbose[1].split() == [
        "#",
        "region",
        "treatment",
        "kept",
        "recompute",
        "option",
        "keeps",
    ]
    assert verbose[3].endswith("ops7    sdpa#0, addmm#1") or verbose[3].endswith("sdpa#0, addmm#1")
    assert "S0: regions 0..1" in str(plan_from_choices(three(), [0, 0, 0], [(0, 2)]))


def test_a_plan_table_groups_regions_alike_and_fits_120_columns():
    layers = [
        RegionPlan(
            name=f"model.language_model.decoder.layers.{i}.very_long_block_name_{'x' * 40}",
            action="store",
            option="store",
            kept_bytes=1_650_000_000,
            recompute_cost=0.0,
        )
        for i in range(30)
    ]
    head = RegionPlan(
        name="head", action="recompute", option="recompute", kept_bytes=10**6, recompute_cost=0.5
    )
    regions = (*layers, head)
    plan = Plan(
        regions=regions, predicted_peak_bytes=10**11, extra_cost=0.5, forward_cost=10.0,
        budget_bytes=2 * 10**11, solver="chain",
        meta={"cost_unit": "seconds", "forward_flops": 1.5e14, "target": "h100"},
    )  # fmt: skip
    lines = str(plan).splitlines()
    assert max(map(len, lines)) <= 120
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 2 and rows[0].startswith("0-29") and "1.65 GB" in rows[0]
    assert "150 TFLOP" in str(plan) and "e+" not in str(plan)
    assert len(plan.table(verbose=True).splitlines()) > 31  # verbose: a row per region


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 gb", 1_500_000_000),
        ("100KiB", 102_400),
        ("123456", 123_456),
        (123456, 123_456),
        (2e9, 2_000_000_000),
        ("40%", 400),
        ("12.5%", 125),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, baseline_bytes=1000) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("6 parsecs", "unknown unit 'parsecs'"),
        ("lots", "'lots' does not parse"),
        ("0MB", "at least 1 byte"),
        (0, "positive"),
        (-5, "positive"),
        ("-3GiB", "does not parse"),
    ],
)
def test_parse_budget_errors_name_the_bad_string(text, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(text, baseline_bytes=1000)


def test_parse_budget_percentage_needs_a_baseline_and_types_are_checked():
    with pytest.raises(ValueError, match="'40%' is a percentage but no baseline_bytes"):
        parse_budget("40%")
    with pytest.raises(TypeError, match="budget"):
        parse_budget(True)
    with pytest.raises(TypeError, match="budget"):
        parse_budget([1])


def test_plan_chain_dispatches_and_checks():
    chain = three()
    assert plan_chain(chain, "100%").extra_cost == 0  # everything fits stored
    for solver in SOLVERS:
        kw = {"n": 1} if solver == "every-n" else {}
        plan = plan_chain(chain, "90%", solver=solver, **kw)
        assert plan.predicted_peak_bytes <= 22 and plan.budget_bytes == 22
    with pytest.raises(
        ValueError,
        match="solver='rotor' is not one of 'auto', 'chain', 'sqrt', 'every-n', 'greedy'",
    ):
        plan_chain(chain, "50%", solver="rotor")
    with pytest.raises(TypeError, match="Chain"):
        plan_chain([three().regions], "50%")
    with pytest.raises(BudgetError) as info:
        plan_chain(chain, 10)
    assert info.value.min_feasible_bytes == 14  # region a's backward alone


def test_recompute_option_costs_the_early_stopped_rerun():
    """A region whose backward needs nothing from its last ops reruns only the ops before
    them: its recompute option costs ``recompute_cost``, and the chain's plans count that."""
    ok = {"fwd_cost": 4.0, "input_bytes": 2, "saved_bytes": 8, "output_bytes": 2}
    early = Region(name="a", **ok, recompute_cost=3.0)
    assert early.rerun_cost == 3.0 and Region(name="b", **ok).rerun_cost == 4.0
    assert {o.name: o.recompute_cost for o in early.menu()}["recompute"] == 3.0
    plan = plan_from_choices(Chain([early, Region(name="b", **ok)]), ["recompute", "recompute"])
    assert plan.extra_cost == 7.0
    assert Chain.from_json(Chain([early]).to_json()).regions[0].recompute_cost == 3.0


def test_the_solver_names_under_remat_planner_still_work_with_a_deprecation_warning():
    import remat.planner
    import remat.solver

    for name in ("Chain", "Region", "plan_chain", "pareto", "simulate"):
        with pytest.warns(DeprecationWarning, match=f"remat.solver.{name}"):
            assert getattr(remat.planner, name) is getattr(remat.solver, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        remat.planner.no_such_name  # noqa: B018


def test_plan_items_are_typed_leaves_and_segments():
    from remat.solver.memory_model import Leaf, Seg, plan_tree

    items = plan_tree([0, 1, 0, 1], [(1, 3)], 0, 4)
    assert [type(it) for it in items] == [Leaf, Seg, Leaf]
    segment = items[1]
    assert (segment.start, segment.stop) == (1, 3)
    assert [(it.region, it.option) for it in segment.items] == [(1, 1), (2, 0)]
    assert items[0] == ("leaf", 0, 0)  # still the tuples the memory model always read
