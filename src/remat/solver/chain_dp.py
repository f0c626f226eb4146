"""The optimal planner for a chain of regions (Rotor-style DP), under the memory model of
:mod:`remat.solver.memory_model`.

The DP (Beaumont et al., "Optimal checkpointing for heterogeneous chains", 2019): with
``C(s, t, m)`` the least extra cost to run sub-chain ``[s, t)`` forward and backward within
``m`` bytes (its input counted inside ``m``),

    C(s, t, m) = min( min_o [m >= need(o)] cost(o) + C(s+1, t, m - kept(o)),
                      min_{s+2 <= e < t} fwd(s, e) + H(s, e, m) + C(e, t, m - in_s) )

where ``need(o)`` is the larger of the region's forward and backward peaks with option ``o``,
and ``H`` is ``C`` for a sequence whose input a checkpoint holds (a segment being rerun): it
differs from ``C`` only where the first region's input is not saved (``kept`` and ``need`` of
its store option grow by the input).

Offloading is searched by the flat DP only: a segment reruns its regions in backward, where
nothing is offloaded, and the nested table's sub-chains serve as segments' insides too. When a
region offers offload, ``solve_chain`` and ``pareto`` also run the flat DP with it and keep
the better plans (plans mixing segments and offload are not searched).

Memory is discretised: every byte count is rounded *up* to a multiple of the resolution and
the budget down, so a plan that fits at the resolution fits in bytes, and the solver is
optimal for the rounded problem. When all sizes share a divisor that gives few enough slots
(``math.gcd``), that divisor is the resolution and the DP is exact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from remat.errors import BudgetError
from remat.solver.discretization import byte_counts, discretize, resolution_for
from remat.solver.memory_model import (
    items_to_plan,
    leaf,
    leaf_bytes,
    pending_bytes,
    plan_from_choices,
    seg,
    segment_forward_peaks,
    simulate,
)
from remat.solver.problem import OFFLOAD, Chain, Region
from remat.solver.solution import Plan

if TYPE_CHECKING:
    import numpy as np


__all__ = ["min_peak_bytes", "pareto", "solve_chain", "store_all_peak"]


_MAX_TABLE = 25_000_000  # float64 cells of the nested DP table (200 MB)
_NESTED_WORK = 5e8  # cell updates of the nested DP: about a second of numpy here
_NESTED_SLOTS = 4000


_FLAT_SLOTS = 20_000


# ----------------------------------------------------------------------------- the DP
def _leaf_terms(r: Region, held: bool, offload: bool = False) -> list[tuple[int, int, int, float]]:
    """Per option of ``r``: (forward peak, backward peak, kept, cost); offload (last on the
    menu) only when ``offload``."""
    out = []
    for o in r.menu():
        if o.kind == OFFLOAD and not offload:
            continue
        kept, fwd, bwd = leaf_bytes(r, o, held)
        out.append((fwd, bwd, kept, o.recompute_cost))
    return out


def _needs_by_stop(fwd: int, bwd: int, stops: range, pending: list[int]) -> dict[int, list[int]]:
    """The stops ``t`` grouped by the leaf's need in ``[s, t)``: its forward peak with
    ``pending[t]`` beside it, or its backward peak."""
    groups: dict[int, list[int]] = {}
    for t in stops:
        groups.setdefault(max(fwd + pending[t], bwd), []).append(t)
    return groups


def _table(q: Chain, m_max: int, nested: bool) -> tuple[np.ndarray, np.ndarray]:
    """``C[s, t, m]`` (nested) or ``C[s, 0, m]`` for ``t = n`` (flat), in slots, and ``H``:
    the same for sequences whose input a checkpoint holds (``H is C`` when that changes
    nothing, i.e. every region's input is saved)."""
    import numpy as np  # lazily: `import remat` must work without numpy

    n = len(q)
    width = n + 1 if nested else 1
    C = np.full((n + 1, width, m_max + 1), np.inf)
    if nested:
        C[np.arange(n + 1), np.arange(n + 1), :] = 0.0
    else:
        C[n, 0, :] = 0.0
    C[n, n if nested else 0, : q.tail_bytes] = np.inf  # the tail runs after the whole chain
    H = C.copy() if _tables(q, nested) == 2 else C
    P = np.concatenate([[0.0], np.cumsum([r.fwd_cost for r in q.regions])])
    ends = _segment_ends(q)
    pending = pending_bytes(q)
    F = np.array(segment_forward_peaks(q), dtype=np.int64)
    slots = np.arange(m_max + 1)
    for s in range(n - 1, -1, -1):
        r = q.regions[s]
        stops = range(s + 1, n + 1) if nested else range(n, n + 1)
        tables = [(C, False)] if H is C else [(C, False), (H, True)]
        for T, held in tables:  # a leaf: T[s, t, m] = cost(o) + C[s+1, t, m - kept(o)]
            for fwd, bwd, k, cost in _leaf_terms(r, held, offload=not nested):
                for need, ts in _needs_by_stop(fwd, bwd, stops, pending).items():
                    if need <= m_max:
                        cols = np.array(ts) if nested else np.array([0])
                        T[s, cols, need:] = np.minimum(
                            T[s, cols, need:], cost + C[s + 1, cols, need - k : m_max + 1 - k]
                        )
        a = r.input_bytes
        if not nested or a > m_max:
            continue
        for t in range(s + 3, n + 1):  # a segment [s, e) with a non-empty rest [e, t)
            last = min(t, ends[s] + 1)  # segments end before a store-only region
            if last <= s + 2:
                continue
            es = slice(s + 2, last)
            A = H[s, es, a:] + C[es, t, : m_max + 1 - a]
            A += (P[s + 2 : last] - P[s])[:, None]
            # the segment's first forward runs with [s, t)'s pending bytes beside it
            A[slots[None, a:] < (F[s, es] + pending[t])[:, None]] = np.inf
            best = A.min(axis=0)
            np.minimum(C[s, t, a:], best, out=C[s, t, a:])
            if H is not C:
                np.minimum(H[s, t, a:], best, out=H[s, t, a:])
    return C, H


def _offers_offload(chain: Chain) -> bool:
    return any(o.kind == OFFLOAD for r in chain.regions for o in r.menu())


def _segment_ends(chain: Chain) -> list[int]:
    """Per start ``s``, the largest stop a segment from ``s`` may have: ``s`` itself (none)
    when region ``s`` cannot be recomputed from its input (``why_stored_only``),
    else the first later region a segment cannot carry on into (``segment_break``), else
    the chain's end. Inside a segment a store-only region is fine: its input is recomputed,
    and its write with it."""
    n = len(chain)
    ends, next_break = [n] * n, n
    for s in range(n - 1, -1, -1):
        r = chain.regions[s]
        ends[s] = s if r.why_stored_only else next_break
        if r.segment_break:
            next_break = s
    return ends


def _reconstruct(q: Chain, C: np.ndarray, H: np.ndarray, m: int, nested: bool) -> list:
    import numpy as np  # lazily: `import remat` must work without numpy

    n = len(q)
    P = np.concatenate([[0.0], np.cumsum([r.fwd_cost for r in q.regions])])
    ends = _segment_ends(q)
    pending = pending_bytes(q)
    F = segment_forward_peaks(q)

    def seq(s: int, t: int, m: int, held: bool) -> list:
        items: list = []
        while s < t:
            r = q.regions[s]
            col = t if nested else 0
            best = (math.inf, None)
            terms = _leaf_terms(r, held, offload=not nested)
            for k, (fwd, bwd, kept, cost) in enumerate(terms):
                if max(fwd + pending[t], bwd) <= m:
                    v = cost + C[s + 1, col, m - kept]
                    if v < best[0]:
                        best = (v, ("leaf", k, kept))
            a = r.input_bytes
            if nested and a <= m:
                for e in range(s + 2, min(t, ends[s] + 1)):
                    if F[s][e] + pending[t] > m:
                        continue
                    v = (P[e] - P[s]) + H[s, e, m] + C[e, t, m - a]
                    if v < best[0]:
                        best = (v, ("seg", e, a))
            kind, x, kept = best[1]
            if kind == "leaf":
                items.append(leaf(s, x))
                s += 1
            else:
                items.append(seg(s, x, seq(s, x, m, True)))
                s = x
            m, held = m - kept, False
        return items

    return seq(0, n, m, False)


def _least_peak_plan(chain: Chain, nested: bool) -> list:
    """A plan reaching the least peak over all plans, exact in bytes.

    ``M[s, t]`` is the least peak of ``[s, t)`` and ``G[s, t]`` the same with its input held
    by a checkpoint. Store and recompute are enough: an op-level option keeps more than
    recompute for the same peak in its backward (a region that cannot recompute has its
    op-level options instead). Offload is left out, so with it on the menu this is an
    upper bound (it can keep less than recompute where nothing saves a region's input).
    Shared inputs count as live throughout, a bound too (when one dies depends on every
    region before, which a chain DP cannot see; ``simulate`` counts them exactly).
    """
    import numpy as np  # lazily: `import remat` must work without numpy

    n, regs = len(chain), chain.regions
    inp = np.array([r.input_bytes for r in regs] + [0], dtype=np.int64)
    terms = {
        held: [
            [
                (fwd, bwd, kept)
                for fwd, bwd, kept, _ in _leaf_terms(r, held)[: None if r.store_only else 2]
            ]
            for r in regs
        ]
        for held in (False, True)
    }
    pending = np.array(pending_bytes(chain), dtype=np.int64)
    F = np.array(segment_forward_peaks(chain), dtype=np.int64)
    M = np.zeros((n + 1, n + 1), dtype=np.int64)  # M[s, t]: least peak of [s, t)
    G = np.zeros((n + 1, n + 1), dtype=np.int64)  # the same, input held
    M[n, n] = G[n, n] = chain.tail_bytes  # only the whole chain's end runs the tail
    ends = _segment_ends(chain)
    for s in range(n - 1, -1, -1):
        ts = np.arange(s + 1, n + 1) if nested else np.array([n])
        for T, held in ((M, False), (G, True)):
            T[s, ts] = np.min(
                [
                    np.maximum(np.maximum(fwd + pending[ts], bwd), kept + M[s + 1, ts])
                    for fwd, bwd, kept in terms[held][s]
                ],
                axis=0,
            )
        if nested:
            for t in range(s + 3, n + 1):
                last = min(t, ends[s] + 1)
                if last <= s + 2:
                    continue
                es = slice(s + 2, last)
                split = np.maximum(G[s, es], inp[s] + M[es, t])
                split = np.maximum(split, F[s, es] + pending[t]).min()
                M[s, t] = min(M[s, t], split)
                G[s, t] = min(G[s, t], split)

    def seq(s: int, t: int, held: bool) -> list:
        items: list = []
        while s < t:
            stop = t if nested else n
            target = (G if held else M)[s, stop]
            rest = M[s + 1, stop]
            fits = [(kept if s + 1 < t else 0, k)
                    for k, (fwd, bwd, kept) in enumerate(terms[held][s])
                    if max(fwd + pending[stop], bwd, kept + rest) == target]  # fmt: skip
            if fits:  # on a tie, what keeps least for what follows, else store (index 0)
                items.append(leaf(s, min(fits)[1]))
                s += 1
            else:
                e = next(
                    e
                    for e in range(s + 2, min(t, ends[s] + 1))
                    if max(G[s, e], inp[s] + M[e, t], F[s, e] + pending[t]) == target
                )
                items.append(seg(s, e, seq(s, e, True)))
                s = e
            held = False
        return items

    return seq(0, n, False)


def min_peak_bytes(chain: Chain, *, nested: bool = True) -> int:
    """The least peak any plan without offload can reach under the memory model, in bytes
    (with shared inputs, that of the plan least under the DP's bound, counted exactly)."""
    return simulate(chain, _least_peak_plan(chain, nested))[0]


def store_all_peak(chain: Chain) -> int:
    """Peak with nothing checkpointed: the baseline that ``"40%"`` budgets refer to."""
    return simulate(chain, [leaf(i, 0) for i in range(len(chain))])[0]


def _check_budget(budget_bytes: int) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(f"budget_bytes must be an int, got {budget_bytes!r}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    return budget_bytes


def _tables(chain: Chain, nested: bool) -> int:
    """How many DP tables ``_table`` keeps: ``H`` besides ``C`` when a nested chain has a
    region whose input, or part of it, nothing saves (``Region.unsaved_input_bytes``:
    what a checkpoint holding it adds, ``memory_model.leaf_bytes``)."""
    return 2 if nested and any(r.unsaved_input_bytes for r in chain.regions) else 1


def _slots(n: int, nested: bool, slots: int | None, tables: int = 1) -> int:
    if not nested:
        return slots or _FLAT_SLOTS
    # The nested DP does about n^3/6 * slots work and keeps (n+1)^2 * slots floats, per table.
    cap = min(
        _MAX_TABLE // (tables * (n + 1) ** 2) - 1,
        int(_NESTED_WORK * 6 / max(1, tables * n**3)),
    )
    return max(8, min(slots or _NESTED_SLOTS, cap))


def _table_slots(n: int, budget: int, r: int, nested: bool, tables: int = 1) -> int:
    m_max = budget // r
    cells = tables * (n + 1) * ((n + 1) if nested else 1) * (m_max + 1)
    if cells > _MAX_TABLE:
        raise ValueError(
            f"resolution_bytes={r} gives {m_max} memory slots, too many for {n} regions; "
            f"use a coarser resolution_bytes or fewer slots"
        )
    return m_max


def _dp(chain: Chain, budget: int, nested: bool, resolution_bytes: int | None, slots: int | None):
    """(rounded chain, table, resolution, whether the resolution is exact) up to ``budget``."""
    n = len(chain)
    tables = _tables(chain, nested)
    r = resolution_for(chain, budget, resolution_bytes, _slots(n, nested, slots, tables))
    exact = all(x % r == 0 for x in byte_counts(chain))
    m_max = _table_slots(n, budget, r, nested, tables)
    q = discretize(chain, r)
    return q, *_table(q, m_max, nested), r, exact


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
        resolution can beat the nested one at a coarse resolution. The flat DP also runs
        when a region offers offload, which only flat plans use.

    Raises:
        BudgetError: no plan fits; ``min_feasible_bytes`` is the least feasible budget.
    """
    import numpy as np  # lazily: `import remat` must work without numpy

    budget = _check_budget(budget_bytes)
    n = len(chain)
    kw = {"budget_bytes": budget, "solver": "chain"}
    if store_all_peak(chain) <= budget:
        return plan_from_choices(chain, [0] * n, **kw)
    # The DP counts the shared inputs live throughout (see ``_least_peak_plan``).
    runs = [nested] if budget > chain.shared_bytes else []
    candidates = []
    while runs:
        nest = runs.pop(0)
        q, C, H, r, exact = _dp(chain, budget - chain.shared_bytes, nest, resolution_bytes, slots)
        if nest and (_offers_offload(chain) or (not exact and resolution_bytes is None)):
            runs.append(False)
        if np.isfinite(C[0, n if nest else 0, -1]):
            items = _reconstruct(q, C, H, C.shape[-1] - 1, nest)
            candidates.append(items_to_plan(chain, items, resolution_bytes=r, **kw))
    if candidates:
        return min(candidates, key=lambda p: p.extra_cost)  # stable: nested wins ties
    items = _least_peak_plan(chain, nested)
    least = simulate(chain, items)[0]
    if least > budget:
        raise BudgetError(
            f"no plan fits {budget} bytes: the least peak is {least} bytes",
            min_feasible_bytes=least,
        )
    # Fits in bytes but not once rounded to the resolution: the least-memory plan fits.
    return items_to_plan(chain, items, solver="chain(min-memory)", budget_bytes=budget)


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
    plans = [
        items_to_plan(chain, _least_peak_plan(chain, nested), solver="chain", budget_bytes=None),
        # store-all, which a rounded table can miss (sizes round up, the budget down)
        plan_from_choices(chain, [0] * n, solver="chain"),
    ]
    runs = [nested]
    while runs:
        nest = runs.pop(0)
        q, C, H, r, exact = _dp(
            chain, max(1, top - chain.shared_bytes), nest, resolution_bytes, slots
        )
        if nest and (_offers_offload(chain) or (not exact and resolution_bytes is None)):
            runs.append(False)
        costs = C[0, n if nest else 0, :]
        prev = math.inf
        for m in range(len(costs)):
            if costs[m] < prev:
                prev = costs[m]
                items = _reconstruct(q, C, H, m, nest)
                plans.append(
                    items_to_plan(
                        chain, items, solver="chain", budget_bytes=None, resolution_bytes=r
                    )
                )
    plans.sort(key=lambda p: (p.predicted_peak_bytes, p.extra_cost))
    front: list[Plan] = []
    for p in plans:
        if not front or p.extra_cost < front[-1].extra_cost - 1e-12 * max(1.0, abs(p.extra_cost)):
            front.append(p)
    return front
