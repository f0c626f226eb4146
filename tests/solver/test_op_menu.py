"""Op-level menus: the knapsack DP against scipy's MILP and against all subsets."""

from __future__ import annotations

import itertools
import random

import pytest

from remat.solver import (
    Chain,
    Op,
    Region,
    knapsack_dp,
    knapsack_milp,
    simulate,
    solve_chain,
    solve_ops,
    with_ops,
)


def random_ops(rng: random.Random, n: int, unit: int = 1) -> list[Op]:
    return [
        Op(name=f"op{i}", output_bytes=rng.randint(1, 30) * unit, recompute_cost=rng.randint(0, 20))
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_dp_equals_milp_at_every_capacity(seed):
    rng = random.Random(seed)
    weights = [rng.randint(1, 25) for _ in range(rng.randint(1, 12))]
    values = [rng.uniform(0, 10) for _ in weights]
    best, _ = knapsack_dp(weights, values, sum(weights))
    for cap in range(0, sum(weights) + 1, 3):
        value, chosen = knapsack_milp(weights, values, cap)
        assert best[cap] == pytest.approx(value, abs=1e-9)
        assert sum(weights[i] for i in chosen) <= cap


@pytest.mark.parametrize("seed", range(10))
def test_menu_is_the_exact_pareto_front_of_all_save_lists(seed):
    rng = random.Random(100 + seed)
    ops = random_ops(rng, rng.randint(1, 9))
    total = sum(o.recompute_cost for o in ops)
    points = set()
    for k in range(len(ops) + 1):
        for subset in itertools.combinations(ops, k):
            points.add(
                (
                    10 + sum(o.output_bytes for o in subset),
                    total - sum(o.recompute_cost for o in subset),
                )
            )
    front = sorted(
        (b, c)
        for b, c in points
        if not any((b2 <= b and c2 < c) or (b2 < b and c2 <= c) for b2, c2 in points)
    )
    menu = solve_ops(ops, input_bytes=10, resolution_bytes=1)
    assert [(o.kept_bytes, o.recompute_cost) for o in menu] == front
    for o in menu:  # each option's save list really has its bytes and cost
        saved = [op for op in ops if op.name in o.save_ops]
        assert o.kept_bytes == 10 + sum(op.output_bytes for op in saved)
        assert o.recompute_cost == total - sum(op.recompute_cost for op in saved)


@pytest.mark.parametrize("seed", range(6))
def test_dp_menu_equals_milp_menu(seed):
    rng = random.Random(200 + seed)
    ops = random_ops(rng, rng.randint(2, 14), unit=4096)  # shared divisor: exact resolution
    dp = solve_ops(ops, input_bytes=4096)
    milp = solve_ops(ops, input_bytes=4096, method="milp")
    assert [(o.kept_bytes, o.recompute_cost) for o in dp] == [
        (o.kept_bytes, o.recompute_cost) for o in milp
    ]


def test_budget_picks_the_cheapest_option_that_fits_and_menus_thin():
    ops = random_ops(random.Random(3), 10)
    menu = solve_ops(ops, input_bytes=5, resolution_bytes=1)
    for budget in (5, 40, 77, 200):
        (best,) = solve_ops(ops, input_bytes=5, budget_bytes=budget, resolution_bytes=1)
        fits = [o for o in menu if o.kept_bytes <= budget]
        assert best.kept_bytes <= budget
        assert best.recompute_cost == min(o.recompute_cost for o in fits)
    assert solve_ops(ops, input_bytes=5, budget_bytes=4) == []
    thin = solve_ops(ops, input_bytes=5, resolution_bytes=1, max_options=4)
    assert len(thin) == 4 and thin[0] == menu[0] and thin[-1] == menu[-1]
    with pytest.raises(ValueError, match="method"):
        solve_ops(ops, method="greedy")


def test_chain_solver_uses_op_level_options():
    # Two regions whose op menus save the cheap-to-keep, costly-to-recompute ops: at a budget
    # between "recompute both" and "store both" the optimum is an op-level mix.
    ops = [
        Op(name="mm", output_bytes=10, recompute_cost=8),
        Op(name="gelu", output_bytes=40, recompute_cost=1),
        Op(name="sdpa", output_bytes=10, recompute_cost=6),
    ]
    base = {"fwd_cost": 15, "input_bytes": 10, "saved_bytes": 70, "output_bytes": 10}
    regions = [with_ops(Region(name=f"b{i}", **base), ops) for i in range(2)]
    assert [o.save_ops for o in regions[0].options] == [("mm",), ("mm", "sdpa")]
    chain = Chain(regions)
    plan = solve_chain(chain, 110, nested=False, resolution_bytes=1)
    assert plan.regions[0].action == "ops" and plan.regions[0].save_ops == ("mm", "sdpa")
    assert plan.extra_cost == 1 + 0  # b0 recomputes gelu, b1 stores (its backward is next)
    items = [
        ("leaf", i, [o.name for o in r.menu()].index(p.option))
        for i, (r, p) in enumerate(zip(regions, plan.regions))
    ]
    assert simulate(chain, items) == (plan.predicted_peak_bytes, plan.extra_cost)
    plain = solve_chain(
        Chain([Region(name=f"b{i}", **base) for i in range(2)]), 110, resolution_bytes=1
    )
    assert plain.extra_cost == 15  # without the menu: recompute b0 whole
