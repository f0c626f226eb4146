"""Op-level options inside one region: which ops' outputs to save (0-1 knapsack).

Model (that of PyTorch's selective checkpointing): when a region is recomputed, its forward
reruns except the ops whose outputs were saved, which are read back instead. It stops once
the last tensor its backward needs is back (early stop), so the ops after that point never
rerun: saving them gains nothing, and the caller passes only the ops before it. So
saving op ``i`` keeps ``output_bytes[i]`` from forward to backward and saves its
``recompute_cost[i]``, whatever the ops' dependencies. An option keeps the region's input
plus the saved outputs, and costs the recompute of the unsaved ops. The best options for
every memory size are a 0-1 knapsack; ``solve_ops`` returns its Pareto frontier, by an exact
DP over bytes (at a resolution) or by ``scipy.optimize.milp`` (epsilon-constraint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import reduce
from typing import TYPE_CHECKING, NamedTuple

from remat.solver.problem import Region, RegionOption

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Op", "knapsack_dp", "knapsack_milp", "solve_ops", "with_ops"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Op:
    """One op inside a region.

    Attributes:
        name: how the op is named in save lists (e.g. ``"aten.mm.default#3"``).
        output_bytes: bytes of its output, kept if it is saved.
        recompute_cost: cost of rerunning it, in the chain's cost unit.
        output_saved: whether autograd saves its output anyway when the region runs
            normally. When it does not (a matmul feeding a residual add), saving it keeps it
            in torch's selective-checkpoint cache through the region's whole backward too.
    """

    name: str
    output_bytes: int
    recompute_cost: float
    output_saved: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.output_bytes, bool) or not isinstance(self.output_bytes, int):
            raise ValueError(
                f"op {self.name!r}: output_bytes must be an int, got {self.output_bytes!r}"
            )
        if self.output_bytes < 0 or not self.recompute_cost >= 0:
            raise ValueError(f"op {self.name!r}: output_bytes and recompute_cost must be >= 0")


def knapsack_dp(weights: Sequence[int], values: Sequence[float], capacity: int):
    """Exact 0-1 knapsack for every capacity ``0..capacity`` (integer weights).

    Returns:
        ``(best, take)``: ``best[c]`` the largest value within weight ``c``; ``take[i, c]``
        whether item ``i`` is taken in that optimum over items ``0..i`` (for backtracking).
    """
    import numpy as np  # lazily: `import remat` must work without numpy

    best = np.zeros(capacity + 1)
    take = np.zeros((len(weights), capacity + 1), dtype=bool)
    for i, (w, v) in enumerate(zip(weights, values)):
        if w > capacity:
            continue
        cand = best[: capacity + 1 - w] + v
        better = cand > best[w:]
        take[i, w:] = better
        best[w:] = np.where(better, cand, best[w:])
    return best, take


def _backtrack(take: np.ndarray, weights: Sequence[int], c: int) -> list[int]:
    chosen = []
    for i in range(len(weights) - 1, -1, -1):
        if take[i, c]:
            chosen.append(i)
            c -= weights[i]
    return sorted(chosen)


def knapsack_milp(weights: Sequence[int], values: Sequence[float], capacity: int):
    """The same knapsack as a MILP (``scipy.optimize.milp``); returns ``(value, chosen)``."""
    import numpy as np  # lazily: `import remat` must work without numpy
    from scipy.optimize import Bounds, LinearConstraint, milp  # heavy; planner-only

    n = len(weights)
    if n == 0:
        return 0.0, []
    res = milp(
        c=-np.asarray(values, dtype=float),
        constraints=LinearConstraint(np.asarray([weights], dtype=float), -np.inf, capacity),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},  # exact: tests compare it with the DP
    )
    if not res.success:
        raise RuntimeError(f"milp failed: {res.message}")
    chosen = [i for i in range(n) if res.x[i] > 0.5]
    return float(sum(values[i] for i in chosen)), chosen


def _resolution(ops: Sequence[Op], resolution_bytes: int | None, slots: int) -> int:
    if resolution_bytes is not None:
        if resolution_bytes < 1:
            raise ValueError(f"resolution_bytes must be >= 1, got {resolution_bytes}")
        return int(resolution_bytes)
    total = sum(o.output_bytes for o in ops)
    g = reduce(math.gcd, (o.output_bytes for o in ops), 0) or 1
    return g if total // g <= slots else max(1, -(-total // slots))


def solve_ops(
    ops: Sequence[Op],
    *,
    input_bytes: int = 0,
    budget_bytes: int | None = None,
    max_options: int | None = None,
    method: str = "dp",
    resolution_bytes: int | None = None,
    slots: int = 4000,
    overhead: float = 0.0,
) -> list[RegionOption]:
    """The Pareto menu of (kept bytes, recompute cost) save lists for one region.

    Args:
        ops: the region's ops.
        input_bytes: the region's input, kept by every option.
        budget_bytes: if given, only the cheapest option keeping at most this many bytes.
        max_options: thin the menu to at most this many options, spread over memory.
        method: ``"dp"`` (exact DP at the resolution) or ``"milp"`` (scipy).
        resolution_bytes: op sizes are rounded up to multiples of this; default: their
            common divisor if it gives at most ``slots`` slots, else ``total / slots``.
        overhead: added to every option's cost: what op-level checkpointing itself costs
            the region (``Profile.op_overhead`` per op), whatever it saves.

    Returns:
        Options from least kept to most, each saving a strictly better set than the one
        before (more bytes, less cost), as ``RegionOption(kind="ops")``. Saving nothing is
        included (it is the region's ``recompute``).
    """

    entries, total_cost = _menu_entries(
        ops, input_bytes, budget_bytes, method, resolution_bytes, slots, overhead
    )
    menu = [_build(ops, e, input_bytes, total_cost, overhead) for e in entries]
    return _thinned(menu, max_options)


def _menu_entries(
    ops: Sequence[Op],
    input_bytes: int,
    budget_bytes: int | None,
    method: str,
    resolution_bytes: int | None,
    slots: int,
    overhead: float,
) -> tuple[list[_Entry], float]:
    """``solve_ops``'s menu before its options are built, and the ops' total cost."""
    if method not in ("dp", "milp"):
        raise ValueError(f"method must be 'dp' or 'milp', got {method!r}")
    r = _resolution(ops, resolution_bytes, slots)
    w = [-(-o.output_bytes // r) for o in ops]
    v = [float(o.recompute_cost) for o in ops]
    total_cost = float(sum(v))
    cap_max = sum(w) if budget_bytes is None else max(-1, (budget_bytes - input_bytes) // r)
    if cap_max < 0:
        return [], total_cost
    sets: list[list[int]] = []
    if method == "dp":
        best, take = knapsack_dp(w, v, cap_max)
        caps = [cap_max] if budget_bytes is not None else range(cap_max + 1)
        prev = -math.inf
        for c in caps:
            if best[c] > prev:
                prev = best[c]
                sets.append(_backtrack(take, w, c))
    else:  # epsilon-constraint: the best set within c, then within (its weight - 1), ...
        c = cap_max
        while c >= 0:
            _, chosen = knapsack_milp(w, v, c)
            sets.append(chosen)
            if budget_bytes is not None:
                break
            c = sum(w[i] for i in chosen) - 1
        sets.reverse()
    return _entries(ops, sets, input_bytes, total_cost, overhead), total_cost


class _Entry(NamedTuple):
    """A menu option before it is built: its name, the ops it saves, its bytes and cost."""

    name: str
    saved: list[int]
    kept_bytes: int
    recompute_cost: float


def _entries(
    ops: Sequence[Op], sets: list[list[int]], input_bytes: int, total_cost: float, overhead: float
) -> list[_Entry]:
    """The menu's save sets with their exact bytes and cost (as ``saving_option`` counts
    them), each cheaper than the one before; building the options is left to those kept
    (a region's menu has hundreds of sets, of which a few are kept)."""
    entries: list[_Entry] = []
    for s in sets:
        saved = [ops[i] for i in s]
        cost = overhead + total_cost - sum(float(o.recompute_cost) for o in saved)
        if entries and cost >= entries[-1].recompute_cost:
            continue  # the exact bytes/cost may tie where the rounded ones did not
        kept = input_bytes + sum(o.output_bytes for o in saved)
        entries.append(_Entry(f"ops{len(entries)}", s, kept, cost))
    return entries


def _build(
    ops: Sequence[Op], entry: _Entry, input_bytes: int, total_cost: float, overhead: float
) -> RegionOption:
    return saving_option(
        entry.name,
        [ops[i] for i in entry.saved],
        input_bytes=input_bytes,
        total_cost=total_cost,
        overhead=overhead,
    )


def _thinned(menu: list[RegionOption], max_options: int | None) -> list[RegionOption]:
    """At most ``max_options`` of ``menu``, spread evenly over it, both ends kept."""
    import numpy as np

    if max_options is None or len(menu) <= max_options:
        return menu
    keep = np.unique(np.linspace(0, len(menu) - 1, max_options).round().astype(int))
    return [menu[i] for i in keep]


def saving_option(
    name: str, saved: Sequence[Op], *, input_bytes: int, total_cost: float, overhead: float = 0.0
) -> RegionOption:
    """The op-level option that saves the outputs of ``saved`` and recomputes the region's
    other ops (``total_cost``: all of its ops' recompute cost; ``overhead``: what op-level
    checkpointing itself costs the region, see ``Profile.op_overhead``)."""
    return RegionOption(
        name=name,
        kept_bytes=input_bytes + sum(o.output_bytes for o in saved),
        recompute_cost=overhead + total_cost - sum(float(o.recompute_cost) for o in saved),
        save_ops=tuple(o.name for o in saved),
        backward_extra_bytes=sum(o.output_bytes for o in saved if not o.output_saved),
    )


def with_ops(
    region: Region, ops: Sequence[Op], *, max_options: int | None = None, **kwargs
) -> Region:
    """``region`` with the op-level options of ``solve_ops`` that store/recompute do not beat
    (at most ``max_options`` of them). A region that cannot recompute (``store_only``) has
    no recompute to beat: every option keeping less than store is on its menu, saving
    nothing included."""
    options = {"budget_bytes": None, "method": "dp", "resolution_bytes": None, "slots": 4000,
               "overhead": 0.0, **kwargs}  # fmt: skip
    entries, total_cost = _menu_entries(ops, region.input_bytes, **options)
    kept = []
    for e in entries:
        inside = region.input_bytes <= e.kept_bytes < region.saved_with_input_bytes
        # a free option (the ops it recomputes cost nothing: Inductor fuses them) beats
        # store by its bytes alone
        cheaper = region.store_only or 0 <= e.recompute_cost < region.rerun_cost
        if inside and cheaper:
            kept.append(e)
    built = [
        _build(ops, e, region.input_bytes, total_cost, options["overhead"])
        for e in _thinned(kept, max_options)
    ]
    return replace(region, options=tuple(built))
