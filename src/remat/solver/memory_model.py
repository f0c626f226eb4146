"""The memory model: the peak and the extra cost of a plan for a chain of regions.

Bytes are counted on top of whatever lives outside the chain (parameters, the
loss). A plan is a sequence of *items*: a region with one of its options (``leaf``), or a
segment of two or more regions checkpointed as one unit whose inside is again a sequence of
items (Rotor's recursion; in PyTorch terms a nested ``checkpoint``). A sequence runs as:

* forward, item by item, with ``K`` = bytes held by the items before:
  a leaf ``i`` with option ``o`` peaks at ``K + kept(o) + out_i + tr_i`` and then holds
  ``kept(o)``; a segment ``[a, b)`` runs its regions without saving anything, region ``j``
  peaking at ``K + in_a + [j > a] in_j + out_j + tr_j``, and then holds ``in_a``;
  an offloaded leaf runs as a stored one but holds only its input (``kept``) until its
  backward, the rest being on the host (``solver.problem.offload_cost`` prices the copies);
* backward, items in reverse, ``K`` = bytes held by the items before: a leaf ``i`` first
  recomputes whatever its option did not keep, so whatever the option it peaks at
  ``K + saved_i + g_i + tr_i`` (its ``backward_bytes``; ``g_i`` the gradient its output
  receives, ``out_i`` unless the model drops part of the output) and frees everything;
  a segment reruns its inner sequence (forward then backward) on top of ``K``; its input,
  held by the checkpoint, is the same storage as its first region's input, counted there;
  the gradient of its output (``g`` of its last region) and the parameter gradients
  made so far (its last region's ``later_gradient_bytes``) are live throughout that rerun's
  forward; the backward peaks of its regions, measured in a real backward, include them.

A region whose input nothing saves (``input_saved=False``: a ReLU keeps its output, not
its input) leaves the input out of its saved bytes. Storing it keeps only those; its input
is live during its forward, and in its backward only when a checkpoint holds it: when it
runs with recompute or an op-level option (its own checkpoint), or when it heads a segment
being rerun ("held" below). Its forward can then peak above its backward.

The chain's shared inputs (``SharedInput``: a mask, rotary tables) are counted once, live
in the backward while a region holds them (``shared_live``); the stored region that is the
last to hold them frees them part-way through its backward and may peak after that, lower
by what the measured step saw (``shared_freed``).

So the peak is mostly reached in backward, while some region's saved activations are live
(recomputed or not) together with everything held for the regions before it. The extra cost
counts each leaf's ``recompute_cost`` once per run of its backward, and the regions of a
segment once more per segment enclosing them. ``simulate`` follows these rules literally;
the dynamic program below is derived from them and tested against exhaustive search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from remat.solver.problem import (
    OFFLOAD,
    RECOMPUTE,
    STORE,
    Chain,
    Region,
    RegionOption,
    option_index,
)
from remat.solver.shared_input import SharedInput
from remat.solver.solution import Plan, RegionPlan, check_segments, offloaded_in_segments

__all__ = [
    "evaluate",
    "items_to_plan",
    "Item",
    "Leaf",
    "Seg",
    "leaf",
    "leaf_bytes",
    "plan_from_choices",
    "plan_tree",
    "seg",
    "shared_freed",
    "shared_live",
    "simulate",
]


class Leaf(NamedTuple):
    """A plan item: region ``region`` run with option ``option`` of its menu."""

    kind: Literal["leaf"]
    region: int
    option: int


class Seg(NamedTuple):
    """A plan item: regions ``[start, stop)`` as one checkpointed segment, and the plan of
    their rerun inside it (``items``)."""

    kind: Literal["seg"]
    start: int
    stop: int
    items: list[Item]


# A plan as the memory model and the solvers walk it: leaves and segments, in chain order.
# Plain tuples of the same shape are accepted too.
Item = Leaf | Seg


def leaf(region: int, option: int) -> Leaf:
    """The item running ``region`` with option ``option`` of its menu."""
    return Leaf("leaf", region, option)


def seg(start: int, stop: int, items: list[Item]) -> Seg:
    """The item running regions ``[start, stop)`` as one segment, ``items`` inside."""
    return Seg("seg", start, stop, items)


# ----------------------------------------------------------------------------- memory model
def leaf_bytes(region: Region, option: RegionOption, held: bool = False) -> tuple[int, int, int]:
    """(bytes kept until its backward, forward peak, backward peak) of ``region`` run with
    ``option`` on top of what is live; ``held``: a checkpoint around it holds its input."""
    spare = region.unsaved_input_bytes  # the input, or the part of it nothing saves
    run = region.output_bytes + region.forward_extra_bytes
    if option.kind in (STORE, OFFLOAD):
        # Both run forward and backward as stored. Offload keeps only its input (as a
        # checkpoint would) until its backward: the rest is copied out as it is saved and
        # comes back for its backward.
        extra = spare if held else 0
        return (
            option.kept_bytes + extra,
            region.saved_bytes + spare + run,
            region.backward_bytes + extra,
        )
    # Its own checkpoint holds the input (counted in kept) until its backward is done.
    kept = option.kept_bytes
    fwd, bwd = kept + run, region.backward_bytes + spare + option.backward_extra_bytes
    measured_fwd = region.recompute_forward_transient_bytes
    measured_bwd = region.recompute_transient_bytes
    if option.kind == RECOMPUTE:
        # Measured under the checkpoint itself: exact where the stored figures are not
        # (the recomputation runs while the output's gradient is live).
        if measured_fwd is not None:
            fwd = kept + region.output_bytes + measured_fwd
        if measured_bwd is not None:
            bwd = kept + region.output_gradient + measured_bwd
        return kept, fwd, bwd
    # Op-level: the ops it keeps live from the start of its forward and of its
    # recomputation, while a full recomputation makes them as it goes, so at any moment it
    # holds at most what a full recomputation holds then plus what it keeps beyond its
    # input: a bound, never under.
    if measured_fwd is not None:
        fwd = max(fwd, kept + region.output_bytes + measured_fwd)
    if measured_bwd is not None:
        bwd = max(bwd, kept + region.output_gradient + measured_bwd)
    return kept, fwd, bwd


def rerun_pending_bytes(region: Region) -> int:
    """What waits while a segment ending with ``region`` reruns its forward: its output's
    gradient, and the parameter gradients of the regions after it."""
    return region.output_gradient + region.later_gradient_bytes


def pending_bytes(q: Chain) -> list[int]:
    """Per stop ``t`` of a sub-chain ``[s, t)``: what is live through its forward beside it.
    Below the chain's end a sub-chain runs only inside a segment's rerun (the inside, or
    the rest after a nested segment), while what the backward made so far waits
    (``rerun_pending_bytes`` of region ``t - 1``); the chain itself: 0."""
    return [0] + [rerun_pending_bytes(r) for r in q.regions[:-1]] + [0]


def segment_forward_peaks(q: Chain) -> list[list[int]]:
    """``F[s][e]``: the peak of a segment ``[s, e)``'s first forward, which saves nothing:
    its input held, each region's input and output and its forward's transient bytes."""
    n = len(q)
    F = [[0] * (n + 1) for _ in range(n + 1)]
    for s in range(n):
        peak = 0
        for j in range(s, n):
            peak = max(peak, _segment_forward_at(q.regions, s, j))
            F[s][j + 1] = peak
    return F


def _segment_forward_at(regs: Sequence[Region], s: int, j: int) -> int:
    """What a segment from region ``s`` holds while its first forward runs region ``j``:
    its input, region ``j``'s input (after the first) and output, and its transient."""
    r = regs[j]
    extra = r.input_bytes if j > s else 0
    return regs[s].input_bytes + extra + r.output_bytes + r.forward_extra_bytes


def simulate(
    chain: Chain,
    items: Sequence[Item],
    base: int = 0,
    held: bool = False,
    tail: int | None = None,
    pending: int = 0,
    *,
    shared: Sequence[int] | None = None,
    forward_shared: int | None = None,
    freed: Sequence[int] | None = None,
) -> tuple[int, float]:
    """Peak bytes and extra cost of running ``items`` on top of ``base`` live bytes
    (``held``: a checkpoint holds the input of the first item, as in a segment's rerun;
    ``tail``: bytes added between the forward and the backward, default the chain's
    ``tail_bytes``; a segment's rerun has none; ``pending``: bytes live during the forward
    only, as the gradient of a segment's output is while the segment reruns its forward).
    ``shared``: per stop ``p``, the chain's shared inputs live while regions ``[0, p)`` have
    yet to run backward (``shared_live``; default: from ``items``, the whole chain's plan);
    ``forward_shared``: those live in the forward (default: per region, those made before
    it, ``Chain.shared_bytes_in_forward``); ``freed``: per region, how much lower than
    with ``shared`` its backward peaks, having freed shared inputs part-way
    (``shared_freed``; default: from ``items``)."""
    if tail is None:
        tail = chain.tail_bytes
    if shared is None:
        shared = shared_live(chain, items)
    if freed is None:
        freed = shared_freed(chain, items)

    def in_forward(region: int) -> int:
        if forward_shared is None:
            return chain.shared_bytes_in_forward(region)
        return forward_shared

    regs = chain.regions
    live, peak, cost, kept, needs = base, base, 0.0, [], []
    for pos, it in enumerate(items):  # forward
        if it[0] == "leaf":
            r = regs[it[1]]
            h, fwd, bwd = leaf_bytes(r, r.menu()[it[2]], held and pos == 0)
            peak = max(peak, live + pending + fwd + in_forward(it[1]))
            needs.append(bwd)
        else:
            a, b = it[1], it[2]
            for j in range(a, b):
                peak = max(peak, live + pending + _segment_forward_at(regs, a, j) + in_forward(j))
                cost += regs[j].fwd_cost
            h = regs[a].input_bytes
            needs.append(0)
        live += h
        kept.append(h)
    peak = max(peak, live + pending + tail + shared[-1])
    for it, h, bwd in zip(reversed(items), reversed(kept), reversed(needs)):  # backward
        live -= h
        if it[0] == "leaf":
            peak = max(peak, live + bwd + shared[it[1] + 1] - freed[it[1]])
            cost += regs[it[1]].menu()[it[2]].recompute_cost
        else:
            # its output's gradient, and later parameters', wait while it reruns its forward;
            # its takers hold the shared inputs they take through the whole rerun
            waiting = rerun_pending_bytes(regs[it[2] - 1])
            now = shared[it[2]]
            p, c = simulate(
                chain,
                it[3],
                live,
                held=True,
                tail=0,
                pending=waiting,
                shared=[now] * (len(regs) + 1),
                forward_shared=now,
                freed=[0] * len(regs),
            )
            peak, cost = max(peak, p), cost + c
    return peak, cost


def shared_live(chain: Chain, items: Sequence[Item]) -> list[int]:
    """Per stop ``p`` (``0..n``): the bytes of the chain's shared inputs live while regions
    ``[0, p)`` have yet to run backward, under the plan ``items`` (``p = n``: the tail).
    One is live while something outside holds it or while the first region to hold it
    (``SharedInput``) has not run backward."""
    n = len(chain)
    if not chain.shared_inputs:
        return [0] * (n + 1)
    checkpointed: set[int] = set()
    _mark_checkpointed(chain, items, False, checkpointed)
    live = [0] * (n + 1)
    for t in chain.shared_inputs:
        holders = [i for i in t.takers if i in checkpointed or i in t.saved_by]
        first = 0 if t.held_outside else (holders[0] + 1 if holders else n + 1)
        for p in range(first, n + 1):
            live[p] += t.nbytes
    return live


def shared_freed(chain: Chain, items: Sequence[Item]) -> list[int]:
    """Per region, how much lower than ``shared_live`` counts its backward peaks under the
    plan ``items``: a stored region that is the last to hold every shared input it is the
    first to save (no checkpoint of a taker before it holds one) frees them part-way
    through its backward, as the measured step did (``SharedInput.freed_before_peak``).
    Where a checkpoint before it holds some of them, it is counted as holding them all
    (its peak with some held may fall anywhere between)."""
    n = len(chain)
    out = [0] * n
    firsts: dict[int, list[SharedInput]] = {}
    for t in chain.shared_inputs:
        if t.saved_by and not t.held_outside:
            firsts.setdefault(t.saved_by[0], []).append(t)
    if not any(t.freed_before_peak for ts in firsts.values() for t in ts):
        return out
    checkpointed: set[int] = set()
    _mark_checkpointed(chain, items, False, checkpointed)
    for region, ts in firsts.items():
        held_before = any(j in checkpointed for t in ts for j in t.takers if j < region)
        if region not in checkpointed and not held_before:
            out[region] = sum(t.freed_before_peak for t in ts)
    return out


def _mark_checkpointed(
    chain: Chain, items: Sequence[Item], in_segment: bool, out: set[int]
) -> None:
    """The regions whose inputs a checkpoint holds until their backward: under their own
    (any option but store) or inside a segment."""
    for it in items:
        if it[0] == "seg":
            _mark_checkpointed(chain, it[3], True, out)
        elif in_segment or chain.regions[it[1]].menu()[it[2]].kind != STORE:
            out.add(it[1])


def plan_tree(choices: Sequence[int], segs: Sequence[tuple[int, int]], lo: int, hi: int) -> list:
    items: list = []
    i = lo
    while i < hi:
        inner = [b for a, b in segs if a == i and b <= hi and (a, b) != (lo, hi)]
        if inner:
            b = max(inner)
            items.append(seg(i, b, plan_tree(choices, segs, i, b)))
            i = b
        else:
            items.append(leaf(i, choices[i]))
            i += 1
    return items


def flatten_items(items: Sequence[Item], choices: list, segs: list) -> None:
    for it in items:
        if it[0] == "leaf":
            choices[it[1]] = it[2]
        else:
            segs.append((it[1], it[2]))
            flatten_items(it[3], choices, segs)


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
    kinds = [r.menu()[k].kind for r, k in zip(chain.regions, idx)]
    offloaded = [chain.regions[i].name for i in offloaded_in_segments(kinds, segs)]
    if offloaded:
        raise ValueError(
            f"segments: a segment holds offloaded regions {offloaded}: a segment reruns its "
            "regions in backward, where nothing is offloaded; offload outside segments"
        )
    for a, b in segs:
        if chain.regions[a].why_stored_only:
            raise ValueError(
                f"segments: ({a}, {b}) starts with region {chain.regions[a].name!r}, which "
                f"cannot be recomputed from its input ({chain.regions[a].why_stored_only})"
            )
        inside = next((i for i in range(a + 1, b) if chain.regions[i].segment_break), None)
        if inside is not None:
            r = chain.regions[inside]
            raise ValueError(
                f"segments: ({a}, {b}) crosses region {r.name!r}, which a segment cannot "
                f"carry on into ({r.segment_break})"
            )
    peak, cost = simulate(chain, plan_tree(idx, segs, 0, n))
    rows = []
    for i, (r, k) in enumerate(zip(chain.regions, idx)):
        o = r.menu()[k]
        action = o.kind  # each kind of option is the action of that name
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
                engine=o.engine,
                note=r.why_stored_only,
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
    choices = [p.option for p in plan.regions]
    checked = plan_from_choices(chain, choices, plan.segments)  # offload outside segments
    return checked.predicted_peak_bytes, checked.extra_cost


def items_to_plan(chain: Chain, items, **kw) -> Plan:
    choices: list = [0] * len(chain)
    segs: list = []
    flatten_items(items, choices, segs)
    return plan_from_choices(chain, choices, segs, **kw)
