"""The solver: pure functions from a chain of regions and a memory budget to a ``Plan``.

``plan_chain(chain, budget, solver=...)`` is the entry point; ``pareto(chain)`` gives the
whole memory/compute frontier. The memory model is documented in ``solver/memory_model.py``.
No torch here: a ``Chain`` is numbers, so a plan can be made, tested and explained without
a model (``remat.profiling`` makes a chain from a model, ``remat.planner`` plans a model).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from remat.errors import check_choice
from remat.solver.budget import parse_budget
from remat.solver.chain_dp import min_peak_bytes, pareto, solve_chain, store_all_peak
from remat.solver.heuristics import every_n_plan, greedy_plan, sqrt_plan
from remat.solver.memory_model import evaluate, plan_from_choices, simulate
from remat.solver.op_menu import Op, knapsack_dp, knapsack_milp, solve_ops, with_ops
from remat.solver.problem import Chain, Region, RegionOption
from remat.solver.shared_input import SharedInput
from remat.solver.solution import Plan, RegionPlan

__all__ = [
    # problem
    "Chain",
    "Op",
    "Region",
    "RegionOption",
    "SharedInput",
    # answer
    "Plan",
    "RegionPlan",
    # solvers
    "SOLVERS",
    "Solver",
    "every_n_plan",
    "greedy_plan",
    "knapsack_dp",
    "knapsack_milp",
    "pareto",
    "plan_chain",
    "solve_chain",
    "solve_ops",
    "sqrt_plan",
    "with_ops",
    # model and budgets
    "evaluate",
    "min_peak_bytes",
    "parse_budget",
    "plan_from_choices",
    "simulate",
    "store_all_peak",
]

Solver = Literal["auto", "chain", "sqrt", "every-n", "greedy"]
SOLVERS: tuple[str, ...] = get_args(Solver)


def plan_chain(
    chain: Chain, budget: int | float | str, *, solver: Solver = "auto", **options: Any
) -> Plan:
    """Plan a chain for a memory budget.

    Args:
        chain: the problem.
        budget: bytes, a size string (``"6GiB"``) or a percentage of the un-checkpointed
            peak (``"40%"``), see ``parse_budget``.
        solver: ``"auto"`` (the optimal chain DP), ``"chain"``, ``"sqrt"``, ``"every-n"`` or
            ``"greedy"``.
        **options: passed to the solver (e.g. ``resolution_bytes=``, ``nested=`` for the
            chain DP; ``n=`` for every-n).

    Returns:
        The ``Plan``; its ``predicted_peak_bytes`` is at most the budget.

    Raises:
        BudgetError: no plan of that solver fits; ``min_feasible_bytes`` says what would.
        ValueError: unknown solver or bad budget.

    Example:
        >>> plan = plan_chain(chain, "40%")
        >>> print(plan)
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be a remat.solver.Chain, got {type(chain).__name__}")
    check_choice("remat.plan_chain", "solver", solver, SOLVERS)
    budget_bytes = parse_budget(budget, baseline_bytes=store_all_peak(chain))
    if solver in ("auto", "chain"):
        return solve_chain(chain, budget_bytes, **options)
    if solver == "sqrt":
        return sqrt_plan(chain, budget_bytes, **options)
    if solver == "every-n":
        return every_n_plan(chain, budget_bytes, **options)
    return greedy_plan(chain, budget_bytes, **options)
