"""The usual hand-made plans, under the same memory model, for comparison with the optimum.

Each returns a ``Plan`` with the same predicted peak and extra cost accounting as
``solve_chain``, so "the optimum is never worse" is a checkable claim (see the tests).
"""

from __future__ import annotations

import itertools
import math

from remat.errors import BudgetError
from remat.solver.memory_model import leaf, plan_from_choices, simulate
from remat.solver.problem import Chain
from remat.solver.solution import Plan

__all__ = ["every_n_plan", "greedy_plan", "sqrt_plan"]


def _check(plan: Plan, budget_bytes: int | None, what: str, least: int | None = None) -> Plan:
    if budget_bytes is not None and plan.predicted_peak_bytes > budget_bytes:
        least = plan.predicted_peak_bytes if least is None else least
        raise BudgetError(
            f"{what}: peak {plan.predicted_peak_bytes} bytes does not fit the budget "
            f"{budget_bytes}; the least budget it fits is {least} bytes",
            min_feasible_bytes=least,
        )
    return plan


def sqrt_plan(chain: Chain, budget_bytes: int | None = None, *, segment: int | None = None) -> Plan:
    """Chen et al.'s √n plan: segments of ⌈√n⌉ regions, each keeping only its input.

    As ``torch.utils.checkpoint.checkpoint_sequential`` does, the last segment is not
    checkpointed (its backward follows its forward at once). A one-region segment is a
    plain ``recompute``.

    Args:
        chain: the problem.
        budget_bytes: if given, raise ``BudgetError`` when the plan does not fit.
        segment: regions per segment (default ``ceil(sqrt(len(chain)))``).
    """
    n = len(chain)
    size = segment if segment is not None else math.ceil(math.sqrt(n))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"segment must be a positive int, got {segment!r}")
    choices = [0] * n
    segments = []
    for a in range(0, n - size, size):  # every segment but the last
        for start, stop in _runs(chain, a, a + size):
            if stop - start == 1:
                choices[start] = 1  # recompute
            else:
                segments.append((start, stop))
    plan = plan_from_choices(chain, choices, segments, budget_bytes=budget_bytes, solver="sqrt")
    return _check(plan, budget_bytes, "sqrt")


def _runs(chain: Chain, a: int, b: int) -> list[tuple[int, int]]:
    """``[a, b)`` as segments may run: cut before each region a segment cannot carry on
    into (``segment_break``), and each piece started at its first region that can be
    recomputed from its input (not ``why_stored_only``: one that writes its input or
    holds bytes outside the graph)."""
    cuts = [a, *(i for i in range(a + 1, b) if chain.regions[i].segment_break), b]
    runs = []
    for lo, hi in itertools.pairwise(cuts):
        start = next((i for i in range(lo, hi) if not chain.regions[i].why_stored_only), None)
        if start is not None:
            runs.append((start, hi))
    return runs


def every_n_plan(chain: Chain, budget_bytes: int | None = None, *, n: int | None = None) -> Plan:
    """Recompute every ``n``-th region (regions ``0, n, 2n, ...``), store the others.

    Args:
        chain: the problem.
        budget_bytes: the budget; when ``n`` is not given, the cheapest ``n`` that fits.
        n: the period; required when ``budget_bytes`` is not given.
    """
    if n is None and budget_bytes is None:
        raise ValueError("every_n_plan: give n, budget_bytes, or both")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"every_n_plan: n must be a positive int, got {n!r}")
    periods = [n] if n is not None else range(1, len(chain) + 1)
    plans = []
    for k in periods:
        choices = [
            1 if i % k == 0 and not r.why_stored_only else 0 for i, r in enumerate(chain.regions)
        ]
        plans.append(
            plan_from_choices(chain, choices, budget_bytes=budget_bytes, solver=f"every-{k}")
        )
    fitting = [p for p in plans if budget_bytes is None or p.predicted_peak_bytes <= budget_bytes]
    if not fitting:
        least = min(p.predicted_peak_bytes for p in plans)
        return _check(
            min(plans, key=lambda p: p.predicted_peak_bytes), budget_bytes, "every-n", least
        )
    return min(fitting, key=lambda p: (p.extra_cost, p.predicted_peak_bytes))


def greedy_plan(chain: Chain, budget_bytes: int) -> Plan:
    """Move regions to leaner options, best bytes saved per unit of cost first, until it fits.

    Each step considers, for every region, each option keeping fewer bytes than its current
    one, and takes the move with the most kept bytes saved per unit of extra cost (free
    moves first).
    """
    regs = chain.regions
    choice = [0] * len(regs)  # everything stored

    def peak() -> int:
        return simulate(chain, [leaf(i, k) for i, k in enumerate(choice)])[0]

    while peak() > budget_bytes:
        best = None
        for i, r in enumerate(regs):
            menu = r.menu()
            cur = menu[choice[i]]
            for k, o in enumerate(menu):
                saved = cur.kept_bytes - o.kept_bytes
                if saved <= 0:
                    continue
                extra = o.recompute_cost - cur.recompute_cost
                score = math.inf if extra <= 0 else saved / extra
                if best is None or score > best[0]:
                    best = (score, i, k)
        if best is None:
            break  # everything is at its leanest option
        choice[best[1]] = best[2]
    plan = plan_from_choices(chain, choice, budget_bytes=budget_bytes, solver="greedy")
    return _check(plan, budget_bytes, "greedy")
