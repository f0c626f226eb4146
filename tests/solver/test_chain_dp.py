"""The chain planner against exhaustive search, Revolve's binomial optimum and the heuristics.

Exhaustive search enumerates every plan (every option per region and, for the nested model,
every way to nest checkpointed segments) and scores it with ``simulate``, the literal memory
model; the DP must find the same least extra cost at every budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
from math import comb

import pytest

from remat.errors import BudgetError
from remat.solver import (
    Chain,
    Region,
    RegionOption,
    SharedInput,
    every_n_plan,
    greedy_plan,
    min_peak_bytes,
    pareto,
    simulate,
    solve_chain,
    sqrt_plan,
    store_all_peak,
)
from remat.solver.discretization import discretize
from remat.solver.memory_model import plan_from_choices, shared_freed, shared_live


def random_chain(
    rng: random.Random,
    n: int,
    *,
    scale: int = 1,
    options: bool = True,
    unsaved: float = 0.0,
    tail: bool = False,
) -> Chain:
    """``unsaved``: the chance that a region's input is not saved (a ReLU after a Linear);
    ``tail``: give the chain a random tail (a head and loss after it)."""
    regions = []
    for i in range(n):
        inp = rng.randint(1, 6) * scale
        input_saved = not unsaved or rng.random() >= unsaved  # the seeds' chains stay put
        saved = (inp if input_saved else 0) + rng.randint(0, 12) * scale
        most = saved if input_saved else saved + inp  # what an op-level option may keep
        opts = []
        if options and most > inp and rng.random() < 0.5:
            kept = scale * rng.randint(inp // scale, most // scale)
            # saved op outputs autograd would not keep: held through the backward (tail
            # chains only, so that the other seeds' chains stay put)
            extra = rng.randint(0, 3) * scale if tail else 0
            opts.append(
                RegionOption(
                    name="half",
                    kept_bytes=kept,
                    recompute_cost=rng.randint(0, 4),
                    backward_extra_bytes=extra,
                )
            )
        regions.append(
            Region(
                name=f"r{i}",
                fwd_cost=rng.randint(1, 9) + rng.random(),
                input_bytes=inp,
                saved_bytes=saved,
                output_bytes=rng.randint(1, 6) * scale,
                transient_bytes=rng.randint(0, 4) * scale,
                options=tuple(opts),
                input_saved=input_saved,
            )
        )
    return Chain(regions, tail_bytes=rng.randint(0, 30) * scale if tail else 0)


def nested_plans(chain: Chain, s: int, t: int):
    """Every plan of sub-chain [s, t): a leaf then a plan of the rest, or a segment [s, e)
    (with any inner plan) then a plan of the rest."""
    if s == t:
        yield []
        return
    for k in range(len(chain.regions[s].menu())):
        for rest in nested_plans(chain, s + 1, t):
            yield [("leaf", s, k), *rest]
    for e in range(s + 2, t):
        for inner in list(nested_plans(chain, s, e)):
            for rest in nested_plans(chain, e, t):
                yield [("seg", s, e, inner), *rest]


def flat_plans(chain: Chain):
    menus = [range(len(r.menu())) for r in chain.regions]
    for ks in itertools.product(*menus):
        yield [("leaf", i, k) for i, k in enumerate(ks)]


def check_against(chain: Chain, scored: list[tuple[int, float]], nested: bool) -> int:
    """Solve at every budget from below the least peak to above the largest; return count."""
    lo = min(p for p, _ in scored)
    hi = max(p for p, _ in scored)
    assert min_peak_bytes(chain, nested=nested) == lo
    for budget in range(max(1, lo - 1), hi + 2):
        best = min((c for p, c in scored if p <= budget), default=None)
        if best is None:
            with pytest.raises(BudgetError) as info:
                solve_chain(chain, budget, nested=nested, resolution_bytes=1)
            assert info.value.min_feasible_bytes == lo
            continue
        plan = solve_chain(chain, budget, nested=nested, resolution_bytes=1)
        assert plan.predicted_peak_bytes <= budget
        assert plan.extra_cost == pytest.approx(best, abs=1e-9), (budget, plan)
    return hi - lo


@pytest.mark.parametrize("seed", range(40))
def test_nested_dp_equals_exhaustive_search(seed):
    rng = random.Random(seed)
    chain = random_chain(rng, rng.randint(1, 6))
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, len(chain))]
    check_against(chain, scored, nested=True)


@pytest.mark.parametrize("seed", range(30))
def test_flat_dp_equals_exhaustive_search(seed):
    rng = random.Random(1000 + seed)
    n = 10 if seed < 3 else rng.randint(1, 8)
    chain = random_chain(rng, n, options=seed >= 3)  # n=10: 2 options per region, 1024 plans
    scored = [simulate(chain, items) for items in flat_plans(chain)]
    check_against(chain, scored, nested=False)


@pytest.mark.parametrize("seed", range(30))
def test_dp_equals_exhaustive_search_with_unsaved_inputs(seed):
    """Regions whose input nothing saves (ReLU after Linear): the store option keeps less
    than the input, and a checkpoint holding the input adds it back."""
    rng = random.Random(5000 + seed)
    chain = random_chain(rng, rng.randint(1, 6), unsaved=0.5, tail=seed % 2 == 1)
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, len(chain))]
    check_against(chain, scored, nested=True)
    scored = [simulate(chain, items) for items in flat_plans(chain)]
    check_against(chain, scored, nested=False)


@pytest.mark.parametrize("seed", range(20))
def test_dp_equals_exhaustive_search_with_a_tail(seed):
    """A tail (head and loss) runs on top of everything the chain keeps: storing the last
    regions is no longer free."""
    rng = random.Random(6000 + seed)
    chain = random_chain(rng, rng.randint(1, 6), tail=True)
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, len(chain))]
    check_against(chain, scored, nested=True)
    scored = [simulate(chain, items) for items in flat_plans(chain)]
    check_against(chain, scored, nested=False)


def test_tail_by_hand():
    def region(name):
        return Region(name=name, fwd_cost=1, input_bytes=10, saved_bytes=30, output_bytes=10)

    chain = Chain([region("a"), region("b")], tail_bytes=100)
    # store both: 30 + 30 held when the tail adds its 100
    assert simulate(chain, [("leaf", 0, 0), ("leaf", 1, 0)]) == (160, 0.0)
    # recompute b: 30 + 10 held; a segment [a, b) would hold 10 only
    assert simulate(chain, [("leaf", 0, 0), ("leaf", 1, 1)])[0] == 140
    assert simulate(chain, [("seg", 0, 2, [("leaf", 0, 0), ("leaf", 1, 0)])])[0] == 110
    assert Chain.from_json(chain.to_json()) == chain


def test_unsaved_input_by_hand():
    """Linear (saves its input) -> ReLU (saves its output, which the next Linear also keeps
    as its input: counted there) -> Linear, 10-byte activations, no transients."""

    def region(name, saved, input_saved=True):
        return Region(name=name, fwd_cost=1, input_bytes=10, saved_bytes=saved,
                      output_bytes=10, input_saved=input_saved)  # fmt: skip

    chain = Chain([region("fc1", 10), region("relu", 0, input_saved=False), region("fc2", 10)])
    # Store all: fc1 keeps its input (10); the ReLU's input (fc1's output) is freed, so the
    # ReLU keeps nothing of its own; fc2 keeps the ReLU's output. The forward of the ReLU
    # peaks at 10 + (its input 10 + its output 10) = 30; fc2's backward at 10 + 10 + 10 = 30.
    assert simulate(chain, [("leaf", 0, 0), ("leaf", 1, 0), ("leaf", 2, 0)]) == (30, 0.0)
    # Recomputing the ReLU alone makes its checkpoint hold fc1's output: 10 more bytes.
    assert simulate(chain, [("leaf", 0, 0), ("leaf", 1, 1), ("leaf", 2, 0)])[0] == 40
    # A segment [relu, fc2) rerun: its checkpoint holds the ReLU's input while fc2 reruns
    # its forward beside the gradient of fc2's output, which waits for the rerun: fc1's
    # input, the ReLU's input, its output (fc2's input), fc2's output and that gradient.
    seg = ("seg", 1, 3, [("leaf", 1, 0), ("leaf", 2, 0)])
    assert simulate(chain, [("leaf", 0, 0), seg]) == (50, 2.0)


def test_shared_input_by_hand():
    """A mask that regions b and d take, that attention adds and does not save: live in the
    forward; in the backward only while a region taking it, and holding it (its own
    checkpoint, a segment, or saving it), has not run its backward."""

    def region(name):
        return Region(name=name, fwd_cost=1, input_bytes=10, saved_bytes=30, output_bytes=10)

    regions = [region(n) for n in "abcd"]
    chain = Chain(regions, shared_inputs=[SharedInput(nbytes=100, takers=(1, 3))])

    def leaves(*choices):  # 0: store, 1: recompute
        return [("leaf", i, k) for i, k in enumerate(choices)]

    # stored everywhere, the mask dies with the forward: the peak is d's forward, with the
    # mask, a..c's saved bytes and d's own saved bytes and output
    assert simulate(chain, leaves(0, 0, 0, 0))[0] == 100 + 3 * 30 + 30 + 10
    assert shared_live(chain, leaves(0, 0, 0, 0)) == [0] * 5
    # d recomputed: its checkpoint holds the mask through d's backward (stop 4, the tail
    # too), then it dies; b recomputed: held through d's, c's and b's backward
    assert shared_live(chain, leaves(0, 0, 0, 1)) == [0, 0, 0, 0, 100]
    assert shared_live(chain, leaves(0, 1, 0, 0)) == [0, 0, 100, 100, 100]
    # b recomputed: d's backward has the mask (b still holds it) beside a's saved bytes,
    # b's input, c's saved bytes, d's saved bytes and its output's gradient
    assert simulate(chain, leaves(0, 1, 0, 0))[0] == 100 + 30 + 10 + 30 + 30 + 10
    # a segment [a, c) holds what b takes until the segment's backward is done
    seg = ("seg", 0, 2, leaves(0, 0)[:2])
    assert shared_live(chain, [seg, ("leaf", 2, 0), ("leaf", 3, 0)]) == [0, 0, 100, 100, 100]
    # saved by d when stored, or held by the model: live until d's backward, or throughout
    saved = SharedInput(nbytes=100, takers=(1, 3), saved_by=(3,))
    assert shared_live(Chain(regions, shared_inputs=[saved]), leaves(0, 0, 0, 0)) == [
        0,
        0,
        0,
        0,
        100,
    ]
    held = SharedInput(nbytes=100, takers=(1, 3), held_outside=True)
    assert shared_live(Chain(regions, shared_inputs=[held]), leaves(0, 0, 0, 0)) == [100] * 5
    assert Chain.from_json(chain.to_json()) == chain


def test_a_stored_first_saver_frees_the_shared_inputs_before_its_peak():
    """Rotary tables every region saves: the first region, stored, is the last to hold
    them, and its backward peaks ``freed_before_peak`` lower for freeing them part-way; a
    checkpoint holds them through it. Of two inputs it is first to save, one held by a
    checkpoint before it: counted held, both."""

    def region(name, transient):
        return Region(
            name=name, fwd_cost=1, input_bytes=10, saved_bytes=30, output_bytes=10,
            transient_bytes=transient, forward_transient_bytes=0,
        )  # fmt: skip

    # a's backward makes the peak (the parameter gradients of all three beside it)
    regions = [region("a", 500), region("b", 50), region("c", 50)]
    table = SharedInput(nbytes=100, takers=(0, 1, 2), saved_by=(0, 1, 2), freed_before_peak=60)
    chain = Chain(regions, shared_inputs=[table])
    held = Chain(regions, shared_inputs=[SharedInput(nbytes=100, takers=(0, 1, 2))])

    def leaves(*choices):  # 0: store, 1: recompute
        return [("leaf", i, k) for i, k in enumerate(choices)]

    assert shared_freed(chain, leaves(0, 0, 1)) == [60, 0, 0]
    assert shared_freed(chain, leaves(1, 0, 0)) == [0, 0, 0]
    # a's backward, stored: its saved bytes, its output's gradient and transient, and the
    # table less what it frees before its peak
    assert simulate(chain, leaves(0, 0, 1))[0] == 30 + 10 + 500 + 100 - 60
    assert simulate(chain, leaves(0, 0, 0))[0] == 30 + 10 + 500 + 100 - 60
    # under its checkpoint, or a segment's, the table is held through it
    for items in (leaves(1, 0, 0), [("seg", 0, 2, leaves(0, 0)[:2]), ("leaf", 2, 0)]):
        assert shared_freed(chain, items) == [0, 0, 0]
        assert simulate(chain, items) == simulate(held, items)
    # b is the first to save both; a takes the first one and, recomputed, holds it
    first = SharedInput(nbytes=100, takers=(0, 1), saved_by=(1,), freed_before_peak=40)
    second = SharedInput(nbytes=100, takers=(1, 2), saved_by=(1, 2), freed_before_peak=20)
    both = Chain(regions, shared_inputs=[first, second])
    assert shared_freed(both, leaves(0, 0, 0)) == [0, 60, 0]
    assert shared_freed(both, leaves(1, 0, 0)) == [0, 0, 0]
    assert Chain.from_json(both.to_json()) == both
    with pytest.raises(ValueError, match="freed_before_peak"):
        SharedInput(nbytes=100, takers=(0, 1), saved_by=(0,), freed_before_peak=101)
    with pytest.raises(ValueError, match="freed_before_peak"):
        SharedInput(nbytes=100, takers=(0, 1), freed_before_peak=10)  # nothing saves it


@pytest.mark.parametrize("seed", range(20))
def test_plans_with_shared_inputs_fit_their_budget(seed):
    """The DP counts shared inputs live throughout (a bound); every plan's exact peak then
    fits the budget, and the least-memory plan's peak is the least feasible budget."""
    rng = random.Random(3000 + seed)
    base = random_chain(rng, 5, tail=True)
    shared = []
    for _ in range(rng.randint(1, 3)):
        takers = sorted(rng.sample(range(5), rng.randint(2, 4)))
        saved_by = [i for i in takers if rng.random() < 0.3]
        nbytes, held_outside = rng.randint(1, 20), rng.random() < 0.2
        freeing = saved_by and not held_outside and rng.random() < 0.5
        shared.append(
            SharedInput(
                nbytes=nbytes,
                takers=takers,
                saved_by=saved_by,
                held_outside=held_outside,
                freed_before_peak=rng.randint(0, nbytes) if freeing else 0,
            )
        )
    chain = Chain(base.regions, tail_bytes=base.tail_bytes, shared_inputs=shared)
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, len(chain))]
    lo, hi = min(p for p, _ in scored), max(p for p, _ in scored)
    least = min_peak_bytes(chain)
    assert lo <= least
    for budget in range(max(1, lo - 1), hi + 2):
        best = min((c for p, c in scored if p <= budget), default=None)
        try:
            plan = solve_chain(chain, budget, resolution_bytes=1)
        except BudgetError as e:
            assert e.min_feasible_bytes == least > budget
            continue
        assert plan.predicted_peak_bytes <= budget
        assert best is not None and plan.extra_cost >= best - 1e-9
    front = pareto(chain, resolution_bytes=1)
    assert front[0].predicted_peak_bytes == least
    assert all(lo <= p.predicted_peak_bytes <= hi for p in front)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_nested_dp_equals_exhaustive_search_7_regions(seed):
    rng = random.Random(2000 + seed)
    chain = random_chain(rng, 7, options=False)
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, 7)]
    check_against(chain, scored, nested=True)


@pytest.mark.parametrize("seed", range(10))
def test_coarse_resolution_is_optimal_for_the_rounded_chain_and_safe_in_bytes(seed):
    rng = random.Random(3000 + seed)
    chain = random_chain(rng, rng.randint(2, 5), scale=1000)
    resolution = 1700  # does not divide the sizes: everything rounds
    rounded = discretize(chain, resolution)
    scored = [simulate(rounded, items) for items in nested_plans(rounded, 0, len(chain))]
    for budget in range(min_peak_bytes(chain), store_all_peak(chain) + 1, 997):
        best = min((c for p, c in scored if p <= budget // resolution), default=None)
        if best is None:
            continue  # fits in bytes but not rounded: covered by the fallback test
        plan = solve_chain(chain, budget, resolution_bytes=resolution)
        assert plan.resolution_bytes == resolution
        assert plan.predicted_peak_bytes <= budget
        assert plan.extra_cost == pytest.approx(best)


def test_least_memory_fallback_when_rounding_hides_the_only_fitting_plans():
    rng = random.Random(7)
    chain = random_chain(rng, 5, scale=1000)
    least = min_peak_bytes(chain)
    plan = solve_chain(chain, least, resolution_bytes=999_983)  # one slot: nothing fits rounded
    assert plan.solver == "chain(min-memory)"
    assert plan.predicted_peak_bytes == least


def revolve_extra_forwards(steps: int, snapshots: int) -> int:
    """Griewank's minimal number of extra forward steps: r*l - C(c+r, c+1), where r is the
    least integer with C(c+r, c) >= l."""
    if steps <= 1:
        return 0
    r = 0
    while comb(snapshots + r, snapshots) < steps:
        r += 1
    return r * steps - comb(snapshots + r, snapshots + 1)


@pytest.mark.parametrize("snapshots", [1, 2, 3, 4])
def test_uniform_chain_matches_revolve_binomial_optimum(snapshots):
    # Revolve's setting: a snapshot (a region's input) is 1 byte, a region's taped
    # activations take far more than all snapshots together, so while one region runs
    # backward only `snapshots` inputs fit beside it.
    tape = 1000
    for steps in range(1, 16):
        chain = Chain(
            [
                Region(name=f"r{i}", fwd_cost=1, input_bytes=1, saved_bytes=tape, output_bytes=0)
                for i in range(steps)
            ]
        )
        plan = solve_chain(chain, tape + snapshots, resolution_bytes=1)
        assert plan.extra_cost == revolve_extra_forwards(steps, snapshots), (steps, snapshots)
    assert revolve_extra_forwards(15, 1) == 15 * 14 // 2  # one snapshot: the quadratic sweep


@pytest.mark.parametrize("seed", range(15))
def test_heuristics_never_beat_the_optimum(seed):
    rng = random.Random(4000 + seed)
    chain = random_chain(rng, rng.randint(2, 12), scale=1000)
    # An exact resolution: the sizes share the divisor 1000.
    plans = [sqrt_plan(chain), every_n_plan(chain, n=2), every_n_plan(chain, n=3)]
    for budget in (min_peak_bytes(chain) + 3000, store_all_peak(chain) * 2 // 3):
        with contextlib.suppress(BudgetError):  # greedy may not reach small budgets
            plans.append(greedy_plan(chain, budget))
    for h in plans:
        optimum = solve_chain(chain, h.predicted_peak_bytes)
        assert optimum.resolution_bytes in (None, 1000)  # None: nothing to checkpoint
        assert optimum.predicted_peak_bytes <= h.predicted_peak_bytes
        assert optimum.extra_cost <= h.extra_cost + 1e-9, (h.solver, h, optimum)


def test_budget_error_names_the_least_feasible_budget():
    chain = random_chain(random.Random(5), 6)
    least = min_peak_bytes(chain)
    with pytest.raises(BudgetError, match=str(least)) as info:
        solve_chain(chain, least - 1)
    assert info.value.min_feasible_bytes == least
    assert solve_chain(chain, least).predicted_peak_bytes <= least
    flat_least = min_peak_bytes(chain, nested=False)
    assert flat_least >= least  # nesting can only help
    with pytest.raises(BudgetError) as info:
        solve_chain(chain, flat_least - 1, nested=False)
    assert info.value.min_feasible_bytes == flat_least


def test_heuristic_budget_errors_say_what_they_would_need():
    chain = random_chain(random.Random(6), 9)
    plan = sqrt_plan(chain)
    with pytest.raises(BudgetError) as info:
        sqrt_plan(chain, plan.predicted_peak_bytes - 1)
    assert info.value.min_feasible_bytes == plan.predicted_peak_bytes
    least_greedy = simulate(chain, [("leaf", i, 1) for i in range(9)])[0]  # all recomputed
    with pytest.raises(BudgetError) as info:
        greedy_plan(chain, min_peak_bytes(chain, nested=False) - 1)
    assert info.value.min_feasible_bytes == least_greedy


def test_pareto_front_is_the_optimum_at_each_of_its_peaks():
    chain = random_chain(random.Random(8), 7)
    front = pareto(chain)
    assert front[0].predicted_peak_bytes == min_peak_bytes(chain)
    assert front[-1].extra_cost == 0
    assert front[-1].predicted_peak_bytes == store_all_peak(chain)
    for a, b in itertools.pairwise(front):
        assert a.predicted_peak_bytes < b.predicted_peak_bytes
        assert a.extra_cost > b.extra_cost
    scored = [simulate(chain, items) for items in nested_plans(chain, 0, len(chain))]
    for p in front:
        best = min(c for peak, c in scored if peak <= p.predicted_peak_bytes)
        assert p.extra_cost == pytest.approx(best)
    # and every exhaustive point is dominated by (or on) the frontier
    for peak, cost in scored:
        on = [p for p in front if p.predicted_peak_bytes <= peak]
        assert on and min(p.extra_cost for p in on) <= cost + 1e-9


def test_store_all_when_the_budget_allows_it():
    chain = random_chain(random.Random(9), 5)
    plan = solve_chain(chain, store_all_peak(chain))
    assert plan.extra_cost == 0 and not plan.segments
    assert {r.action for r in plan.regions} == {"store"}


def test_long_chain_plans_within_the_table_limit():
    chain = random_chain(random.Random(10), 60, scale=2**20)
    least = min_peak_bytes(chain, nested=False)  # so that the flat DP fits too
    budget = least + (store_all_peak(chain) - least) // 4
    plan = solve_chain(chain, budget)
    assert plan.predicted_peak_bytes <= budget
    flat = solve_chain(chain, budget, nested=False)
    assert plan.extra_cost <= flat.extra_cost + 1e-9  # nested plans include the flat ones
    with pytest.raises(ValueError, match="resolution_bytes"):
        solve_chain(chain, budget, resolution_bytes=1)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_default_resolution_still_beats_heuristics_on_a_long_rounded_chain(fraction):
    # Odd sizes: no common divisor, so the nested DP rounds and the fine flat DP backs it up.
    rng = random.Random(11)
    chain = Chain(
        [
            Region(
                name=f"r{i}",
                fwd_cost=rng.uniform(1, 10),
                input_bytes=(inp := rng.randint(10_000, 90_000)),
                saved_bytes=inp + rng.randint(20_000, 400_000),
                output_bytes=rng.randint(10_000, 90_000),
                transient_bytes=rng.randint(0, 60_000),
            )
            for i in range(80)
        ]
    )
    budget = int(store_all_peak(chain) * fraction)
    plan = solve_chain(chain, budget)
    assert plan.predicted_peak_bytes <= budget
    for h in (greedy_plan(chain, budget), every_n_plan(chain, budget)):
        assert plan.extra_cost <= h.extra_cost + 1e-9, h.solver


def test_table_size_limit_counts_the_second_table():
    """A chain with a region whose input nothing saves keeps a second DP table (for segment
    reruns): the size limit must count it, or the DP would use twice the memory it allows."""

    def chain(input_saved: bool) -> Chain:
        sizes = dict(fwd_cost=1, input_bytes=1, saved_bytes=300, output_bytes=1)
        saved = [input_saved or i % 2 == 0 for i in range(49)]
        return Chain([Region(name=f"r{i}", **sizes, input_saved=s) for i, s in enumerate(saved)])

    # storing all needs ~15 KB; 50 x 50 x 7001 cells: one table fits the limit (25 M), two not
    with pytest.raises(ValueError, match="too many for 49 regions"):
        solve_chain(chain(False), 7000, resolution_bytes=1)
    from remat.solver.chain_dp import _slots, _tables

    assert _tables(chain(True), nested=True) == 1 and _tables(chain(False), nested=True) == 2
    assert _slots(49, True, 10**6, tables=2) < _slots(49, True, 10**6, tables=1)


def _chain_with_break(at: int | None, n: int = 6) -> Chain:
    return Chain(
        [
            Region(
                name=f"r{i}",
                fwd_cost=1.0,
                input_bytes=10,
                saved_bytes=40,
                output_bytes=10,
                segment_break="its input is made between" if i == at else "",
            )
            for i in range(n)
        ]
    )


def _crosses(segments, at: int) -> bool:
    return any(a < at < b for a, b in segments)


def test_no_plan_has_a_segment_across_a_segment_break():
    """A region whose input the model makes between the regions ends every segment before
    it: the DP's frontier, its least-memory plan, sqrt and a hand-made plan alike."""
    free = pareto(_chain_with_break(None))
    assert any(_crosses(p.segments, 3) for p in free)  # without the break, they do cross
    chain = _chain_with_break(3)
    front = pareto(chain)
    assert front and not any(_crosses(p.segments, 3) for p in front)
    least = min_peak_bytes(chain)
    assert least > min_peak_bytes(_chain_with_break(None))
    assert min(p.predicted_peak_bytes for p in front) == least
    assert not _crosses(sqrt_plan(chain, segment=6).segments, 3)
    with pytest.raises(ValueError, match="crosses region 'r3'"):
        plan_from_choices(chain, [0] * 6, [(1, 5)])


def _offload_kind(chain: Chain, item) -> bool:
    return item[0] == "leaf" and chain.regions[item[1]].menu()[item[2]].kind == "offload"


@pytest.mark.parametrize("seed", range(30))
def test_dp_with_offload_equals_exhaustive_search_of_the_plans_it_searches(seed):
    """Offload on the menu (random transfer costs, inputs saved or not, a tail): the
    solver's best equals the best of the nested plans without offload and of every flat
    plan (offload is searched without segments), at every budget."""
    rng = random.Random(9000 + seed)
    base = random_chain(rng, rng.randint(1, 6), unsaved=0.3, tail=seed % 2 == 1)
    regions = [
        dataclasses.replace(r, offload_cost=rng.choice([0.0, rng.uniform(0, 6)]))
        if rng.random() < 0.7 else r
        for r in base.regions
    ]  # fmt: skip
    chain = Chain(regions, tail_bytes=base.tail_bytes)
    nested = [
        items for items in nested_plans(chain, 0, len(chain))
        if not any(_offload_kind(chain, it) for it in items)
        and not _has_offload_inside(chain, items)
    ]  # fmt: skip
    scored = [simulate(chain, items) for items in [*nested, *flat_plans(chain)]]
    lo, hi = min(p for p, _ in scored), max(p for p, _ in scored)
    for budget in range(max(1, lo - 1), hi + 2):
        best = min((c for p, c in scored if p <= budget), default=None)
        if best is None:
            with pytest.raises(BudgetError):
                solve_chain(chain, budget, resolution_bytes=1)
            continue
        plan = solve_chain(chain, budget, resolution_bytes=1)
        assert plan.predicted_peak_bytes <= budget
        assert plan.extra_cost == pytest.approx(best, abs=1e-9), (budget, plan)
    front = pareto(chain, resolution_bytes=1)
    for p, c in scored:  # every searched plan is dominated by (or on) the frontier
        assert any(f.predicted_peak_bytes <= p and f.extra_cost <= c + 1e-9 for f in front)


def _has_offload_inside(chain: Chain, items) -> bool:
    return any(
        it[0] == "seg" and (any(_offload_kind(chain, x) for x in it[3])
                            or _has_offload_inside(chain, it[3]))
        for it in items
    )  # fmt: skip
