"""The memory model, and the optimal planner for a chain of regions (Rotor-style DP).

Memory model. Bytes are counted on top of whatever lives outside the chain (parameters, the
loss). A plan is a sequence of *items*: a region with one of its options (``leaf``), or a
segment of two or more regions checkpointed as one unit whose inside is again a sequence of
items (Rotor's recursion; in PyTorch terms a nested ``checkpoint``). A sequence runs as:

* forward, item by item, with ``K`` = bytes held by the items before:
  a leaf ``i`` with option ``o`` peaks at ``K + kept(o) + out_i + tr_i`` and then holds
  ``kept(o)``; a segment ``[a, b)`` runs its regions without saving anything, region ``j``
  peaking at ``K + in_a + [j > a] in_j + out_j + tr_j``, and then holds ``in_a``;
* backward, items in reverse, ``K`` = bytes held by the items before: a leaf ``i`` first
  recomputes whatever its option did not keep, so whatever the option it peaks at
  ``K + saved_i + out_i + tr_i`` (its ``backward_bytes``) and frees everything;
  a segment reruns its inner sequence (forward then backward) on top of ``K``; its input,
  held by the checkpoint, is the same storage as its first region's input, counted there.

So the peak is reached in backward, while some region's saved activations are live
(recomputed or not) together with everything held for the regions before it. The extra cost
counts each leaf's ``recompute_cost`` once per run of its backward, and the regions of a
segment once more per segment enclosing them. ``simulate`` follows these rules literally;
the dynamic program below is derived from them and tested against exhaustive search.

The DP (Beaumont et al., "Optimal checkpointing for heterogeneous chains", 2019): with
``C(s, t, m)`` the least extra cost to run sub-chain ``[s, t)`` forward and backward within
``m`` bytes (its input counted inside ``m``),

    C(s, t, m) = min( min_o [m >= bwd_s] cost(o) + C(s+1, t, m - kept(o)),
                      min_{s+2 <= e < t} fwd(s, e) + C(s, e, m) + C(e, t, m - in_s) )

Memory is discretised: every byte count is rounded *up* to a multiple of the resolution and
the budget down, so a plan that fits at the resolution fits in bytes, and the solver is
optimal for the rounded problem. When all sizes share a divisor that gives few enough slots
(``math.gcd``), that divisor is the resolution and the DP is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import reduce
from typing import TYPE_CHECKING

from remat.errors import BudgetError
from remat.planner.plan import (
    OPS,
    RECOMPUTE,
    STORE,
    Chain,
    Plan,
    Region,
    RegionPlan,
    check_segments,
    option_index,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "discretize",
    "evaluate",
    "min_peak_bytes",
    "pareto",
    "plan_from_choices",
    "simulate",
    "solve_chain",
    "store_all_peak",
]

Item = tuple  # ("leaf", i, option_index) | ("seg", a, b, [items])
_MAX_TABLE = 25_000_000  # float64 cells of the nested DP table (200 MB)
_NESTED_WORK = 5e8  # cell updates of the nested DP: about a second of numpy here
_NESTED_SLOTS = 4000
_FLAT_SLOTS = 20_000


# ----------------------------------------------------------------------------- memory model
def simulate(chain: Chain, items: Sequence[Item], base: int = 0) -> tuple[int, float]:
    """Peak bytes and extra cost of running ``items`` on top of ``base`` live bytes."""
    regs = chain.regions
    live, peak, cost, held = base, base, 0.0, []
    for it in items:  # forward
        if it[0] == "leaf":
            r, o = regs[it[1]], regs[it[1]].menu()[it[2]]
            peak = max(peak, live + o.kept_bytes + r.output_bytes + r.transient_bytes)
            h = o.kept_bytes
        else:
            a, b = it[1], it[2]
            for j in range(a, b):
                r = regs[j]
                extra = r.input_bytes if j > a else 0
                peak = max(
                    peak, live + regs[a].input_bytes + extra + r.output_bytes + r.transient_bytes
                )
                cost += r.fwd_cost
            h = regs[a].input_bytes
        live += h
        held.append(h)
    for it, h in zip(reversed(items), reversed(held)):  # backward
        live -= h
        if it[0] == "leaf":
            r = regs[it[1]]
            peak = max(peak, live + r.backward_bytes)
            cost += r.menu()[it[2]].recompute_cost
        else:
            p, c = simulate(chain, it[3], live)
            peak, cost = max(peak, p), cost + c
    return peak, cost


def _tree(choices: Sequence[int], segs: Sequence[tuple[int, int]], lo: int, hi: int) -> list:
    items: list = []
    i = lo
    while i < hi:
        inner = [b for a, b in segs if a == i and b <= hi and (a, b) != (lo, hi)]
        if inner:
            b = max(inner)
            items.append(("seg", i, b, _tree(choices, segs, i, b)))
            i = b
        else:
            items.append(("leaf", i, choices[i]))
            i += 1
    return items


def _flatten(items: Sequence[Item], choices: list, segs: list) -> None:
    for it in items:
        if it[0] == "leaf":
            choices[it[1]] = it[2]
        else:
            segs.append((it[1], it[2]))
            _flatten(it[3], choices, segs)


def plan_from_choices(
    chain: Chain,
    choices: Sequence[int | str],
    segments: Sequence[tuple[int, int]] = (),
    *,
    budget_bytes: int | None = None,
    solver: str = "manual",
    resolution_bytes: int | None = None,
) -> Plan:
    """Build a ``Plan`` (with its predicted peak and extra cost) from per-region options.

    Args:
        chain: the problem.
        choices: per region, an option name or index into ``region.menu()``.
        segments: multi-region checkpointed segments ``(start, stop)``, properly nested.
        budget_bytes, solver, resolution_bytes: recorded in the plan.
    """
    n = len(chain)
    if len(choices) != n:
        raise ValueError(f"choices: expected {n} entries (one per region), got {len(choices)}")
    idx = [
        option_index(r, c) if isinstance(c, str) else int(c) for r, c in zip(chain.regions, choices)
    ]
    for r, k in zip(chain.regions, idx):
        if not 0 <= k < len(r.menu()):
            raise ValueError(f"choices: region {r.name!r} has no option index {k}")
    segs = check_segments(n, segments)
    peak, cost = simulate(chain, _tree(idx, segs, 0, n))
    rows = []
    for i, (r, k) in enumerate(zip(chain.regions, idx)):
        o = r.menu()[k]
        action = {STORE: STORE, RECOMPUTE: RECOMPUTE, OPS: OPS}[o.kind]
        depth = sum(a <= i < b for a, b in segs)
        rows.append(
            RegionPlan(
                name=r.name,
                action=action,
                option=o.name,
                kept_bytes=o.kept_bytes,
                recompute_cost=o.recompute_cost,
                save_ops=o.save_ops,
                depth=depth,
            )
        )
    return Plan(
        regions=tuple(rows),
        segments=segs,
        predicted_peak_bytes=peak,
        extra_cost=cost,
        forward_cost=chain.forward_cost,
        budget_bytes=budget_bytes,
        solver=solver,
        resolution_bytes=resolution_bytes,
    )


def evaluate(chain: Chain, plan: Plan) -> tuple[int, float]:
    """Re-predict a plan's (peak bytes, extra cost) on ``chain``, e.g. after ``from_json``."""
    if [r.name for r in chain.regions] != [r.name for r in plan.regions]:
        raise ValueError("plan: its regions do not match the chain's (names or order differ)")
    if any(r.action == "offload" for r in plan.regions):
        raise NotImplementedError("offload is not in the memory model yet")
    idx = [option_index(r, p.option) for r, p in zip(chain.regions, plan.regions)]
    segs = check_segments(len(chain), plan.segments)
    return simulate(chain, _tree(idx, segs, 0, len(chain)))


def _items_to_plan(chain: Chain, items, **kw) -> Plan:
    choices: list = [0] * len(chain)
    segs: list = []
    _flatten(items, choices, segs)
    return plan_from_choices(chain, choices, segs, **kw)


# ----------------------------------------------------------------------------- discretisation
def _sizes(chain: Chain) -> list[int]:
    out = []
    for r in chain.regions:
        out += [r.input_bytes, r.saved_bytes, r.output_bytes, r.transient_bytes]
        out += [o.kept_bytes for o in r.options]
    return out


def _resolution(chain: Chain, budget: int, resolution_bytes: int | None, slots: int) -> int:
    if resolution_bytes is not None:
        if isinstance(resolution_bytes, bool) or not isinstance(resolution_bytes, int):
            raise TypeError(f"resolution_bytes must be an int, got {resolution_bytes!r}")
        if resolution_bytes < 1:
            raise ValueError(f"resolution_bytes must be >= 1, got {resolution_bytes}")
        return resolution_bytes
    g = reduce(math.gcd, _sizes(chain), 0) or 1
    return g if budget // g <= slots else max(1, -(-budget // slots))


def discretize(chain: Chain, resolution: int) -> Chain:
    """The chain with every byte count rounded up to whole ``resolution`` slots."""

    def up(x: int) -> int:
        return -(-x // resolution)

    regions = []
    for r in chain.regions:
        opts = tuple(replace(o, kept_bytes=up(o.kept_bytes)) for o in r.options)
        regions.append(
            Region(
                name=r.name,
                fwd_cost=r.fwd_cost,
                input_bytes=up(r.input_bytes),
                saved_bytes=up(r.saved_bytes),
                output_bytes=up(r.output_bytes),
                transient_bytes=up(r.transient_bytes),
                options=opts,
            )
        )
    return Chain(regions)


# ----------------------------------------------------------------------------- the DP
def _table(q: Chain, m_max: int, nested: bool) -> np.ndarray:
    """``C[s, t, m]`` (nested) or ``C[s, 0, m]`` for ``t = n`` (flat), in slots."""
    import numpy as np  # lazily: `import remat` must work without numpy

    n = len(q)
    width = n + 1 if nested else 1
    C = np.full((n + 1, width, m_max + 1), np.inf)
    if nested:
        C[np.arange(n + 1), np.arange(n + 1), :] = 0.0
    else:
        C[n, 0, :] = 0.0
    P = np.concatenate([[0.0], np.cumsum([r.fwd_cost for r in q.regions])])
    for s in range(n - 1, -1, -1):
        r = q.regions[s]
        w = r.backward_bytes
        ts = slice(s + 1, n + 1) if nested else slice(0, 1)
        if w <= m_max:  # a leaf: C[s, t, m] = cost(o) + C[s+1, t, m - kept(o)] for m >= w
            best = C[s, ts, w:]
            for o in r.menu():
                k = o.kept_bytes
                np.minimum(best, o.recompute_cost + C[s + 1, ts, w - k : m_max + 1 - k], out=best)
        a = r.input_bytes
        if not nested or a > m_max:
            continue
        for t in range(s + 3, n + 1):  # a segment [s, e) with a non-empty rest [e, t)
            es = slice(s + 2, t)
            A = C[s, es, a:] + C[es, t, : m_max + 1 - a]
            A += (P[s + 2 : t] - P[s])[:, None]
            np.minimum(C[s, t, a:], A.min(axis=0), out=C[s, t, a:])
    return C


def _reconstruct(q: Chain, C: np.ndarray, m: int, nested: bool) -> list:
    import numpy as np  # lazily: `import remat` must work without numpy

    n = len(q)
    P = np.concatenate([[0.0], np.cumsum([r.fwd_cost for r in q.regions])])

    def seq(s: int, t: int, m: int) -> list:
        items: list = []
        while s < t:
            r = q.regions[s]
            col = (lambda tt: tt) if nested else (lambda tt: 0)
            best = (math.inf, None)
            if r.backward_bytes <= m:
                for k, o in enumerate(r.menu()):
                    v = o.recompute_cost + C[s + 1, col(t), m - o.kept_bytes]
                    if v < best[0]:
                        best = (v, ("leaf", k))
            a = r.input_bytes
            if nested and a <= m:
                for e in range(s + 2, t):
                    v = (P[e] - P[s]) + C[s, e, m] + C[e, t, m - a]
                    if v < best[0]:
                        best = (v, ("seg", e))
            kind, x = best[1]
            if kind == "leaf":
                items.append(("leaf", s, x))
                m -= r.menu()[x].kept_bytes
                s += 1
            else:
                items.append(("seg", s, x, seq(s, x, m)))
                m -= a
                s = x
        return items

    return seq(0, n, m)


def _min_peak(chain: Chain, nested: bool) -> tuple[int, list]:
    """The least peak over all plans, exact in bytes, and a plan reaching it."""
    import numpy as np  # lazily: `import remat` must work without numpy

    n, regs = len(chain), chain.regions
    inp = np.array([r.input_bytes for r in regs] + [0], dtype=np.int64)
    w = np.array([r.backward_bytes for r in regs], dtype=np.int64)
    M = np.zeros((n + 1, n + 1), dtype=np.int64)  # M[s, t]: least peak of [s, t)
    for s in range(n - 1, -1, -1):
        ts = np.arange(s + 1, n + 1) if nested else np.array([n])
        M[s, ts] = np.maximum(w[s], inp[s] + M[s + 1, ts])  # a leaf, cheapest option: recompute
        if nested:
            for t in range(s + 3, n + 1):
                seg = np.maximum(M[s, s + 2 : t], inp[s] + M[s + 2 : t, t]).min()
                M[s, t] = min(M[s, t], seg)

    def seq(s: int, t: int) -> list:
        items: list = []
        while s < t:
            target = M[s, t] if nested else M[s, n]
            leaf = max(w[s], inp[s] + (M[s + 1, t] if s + 1 < t else 0))
            if nested and leaf > target:
                e = next(e for e in range(s + 2, t) if max(M[s, e], inp[s] + M[e, t]) == target)
                items.append(("seg", s, e, seq(s, e)))
                s = e
            else:  # recompute keeps least; the last region of a sequence may as well store
                items.append(("leaf", s, 0 if s + 1 == t else 1))
                s += 1
        return items

    return int(M[0, n]), seq(0, n)


def min_peak_bytes(chain: Chain, *, nested: bool = True) -> int:
    """The least peak any plan can reach under the memory model, in bytes."""
    return _min_peak(chain, nested)[0]


def store_all_peak(chain: Chain) -> int:
    """Peak with nothing checkpointed: the baseline that ``"40%"`` budgets refer to."""
    return simulate(chain, [("leaf", i, 0) for i in range(len(chain))])[0]


def _check_budget(budget_bytes: int) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(f"budget_bytes must be an int, got {budget_bytes!r}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    return budget_bytes


def _slots(n: int, nested: bool, slots: int | None) -> int:
    if not nested:
        return slots or _FLAT_SLOTS
    # The nested DP does about n^3/6 * slots work and keeps (n+1)^2 * slots floats.
    cap = min(_MAX_TABLE // (n + 1) ** 2 - 1, int(_NESTED_WORK * 6 / max(1, n**3)))
    return max(8, min(slots or _NESTED_SLOTS, cap))


def _table_slots(n: int, budget: int, r: int, nested: bool) -> int:
    m_max = budget // r
    cells = (n + 1) * ((n + 1) if nested else 1) * (m_max + 1)
    if cells > _MAX_TABLE:
        raise ValueError(
            f"resolution_bytes={r} gives {m_max} memory slots, too many for {n} regions; "
            f"use a coarser resolution_bytes or fewer slots"
        )
    return m_max


def _dp(chain: Chain, budget: int, nested: bool, resolution_bytes: int | None, slots: int | None):
    """(rounded chain, table, resolution, whether the resolution is exact) up to ``budget``."""
    n = len(chain)
    r = _resolution(chain, budget, resolution_bytes, _slots(n, nested, slots))
    exact = all(x % r == 0 for x in _sizes(chain))
    m_max = _table_slots(n, budget, r, nested)
    q = discretize(chain, r)
    return q, _table(q, m_max, nested), r, exact


def solve_chain(
    chain: Chain,
    budget_bytes: int,
    *,
    nested: bool = True,
    resolution_bytes: int | None = None,
    slots: int | None = None,
) -> Plan:
    """The plan of least extra cost whose predicted peak fits ``budget_bytes``.

    Args:
        chain: the problem.
        budget_bytes: the memory budget, in bytes.
        nested: allow checkpointed segments inside segments (Rotor); ``False`` restricts
            plans to one option per region.
        resolution_bytes: memory resolution; default: the sizes' common divisor when it
            gives at most ``slots`` slots, else ``budget_bytes / slots``.
        slots: memory slots when the resolution is chosen automatically; default 20000
            for the flat DP and up to 4000 for the nested one (fewer for long chains, so
            that its table stays under 200 MB and its time near a second).

    Returns:
        The optimal ``Plan`` at that resolution (``plan.resolution_bytes``). When the
        nested DP had to round sizes (no explicit ``resolution_bytes``), the flat DP also
        runs at its much finer resolution, and the cheaper of the two plans is returned:
        rounding errors add up along a long chain, and the flat optimum at a fine
        resolution can beat the nested one at a coarse resolution.

    Raises:
        BudgetError: no plan fits; ``min_feasible_bytes`` is the least feasible budget.
    """
    import numpy as np  # lazily: `import remat` must work without numpy

    budget = _check_budget(budget_bytes)
    n = len(chain)
    kw = {"budget_bytes": budget, "solver": "chain"}
    if store_all_peak(chain) <= budget:
        return plan_from_choices(chain, [0] * n, **kw)
    runs = [nested]
    candidates = []
    while runs:
        nest = runs.pop(0)
        q, C, r, exact = _dp(chain, budget, nest, resolution_bytes, slots)
        if nest and not exact and resolution_bytes is None:
            runs.append(False)
        if np.isfinite(C[0, n if nest else 0, -1]):
            items = _reconstruct(q, C, C.shape[-1] - 1, nest)
            candidates.append(_items_to_plan(chain, items, resolution_bytes=r, **kw))
    if candidates:
        return min(candidates, key=lambda p: p.extra_cost)  # stable: nested wins ties
    least, items = _min_peak(chain, nested)
    if least > budget:
        raise BudgetError(
            f"no plan fits {budget} bytes: the least peak is {least} bytes",
            min_feasible_bytes=least,
        )
    # Fits in bytes but not once rounded to the resolution: the least-memory plan fits.
    return _items_to_plan(chain, items, solver="chain(min-memory)", budget_bytes=budget)


def pareto(
    chain: Chain,
    *,
    nested: bool = True,
    resolution_bytes: int | None = None,
    slots: int | None = None,
) -> list[Plan]:
    """The frontier of (predicted peak, extra cost) plans, from least memory to least cost.

    One DP table up to the un-checkpointed peak gives the optimal cost at every memory
    slot; each step of that staircase is one plan (as in ``solve_chain``, a rounded nested
    table is complemented by the flat one at a finer resolution). Plans dominated once
    their exact peaks are computed are dropped.
    """
    n = len(chain)
    top = store_all_peak(chain)
    plans = [_items_to_plan(chain, _min_peak(chain, nested)[1], solver="chain", budget_bytes=None)]
    runs = [nested]
    while runs:
        nest = runs.pop(0)
        q, C, r, exact = _dp(chain, top, nest, resolution_bytes, slots)
        if nest and not exact and resolution_bytes is None:
            runs.append(False)
        costs = C[0, n if nest else 0, :]
        prev = math.inf
        for m in range(len(costs)):
            if costs[m] < prev:
                prev = costs[m]
                items = _reconstruct(q, C, m, nest)
                plans.append(
                    _items_to_plan(
                        chain, items, solver="chain", budget_bytes=None, resolution_bytes=r
                    )
                )
    plans.sort(key=lambda p: (p.predicted_peak_bytes, p.extra_cost))
    front: list[Plan] = []
    for p in plans:
        if not front or p.extra_cost < front[-1].extra_cost - 1e-12 * max(1.0, abs(p.extra_cost)):
            front.append(p)
    return front
