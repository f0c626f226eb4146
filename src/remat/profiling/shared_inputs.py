"""Inputs several regions share (an attention mask, rotary tables, an encoder's output):
found in the profiling records, followed through the measured step, and handed to the
chain as :class:`remat.solver.SharedInput`, counted once and live in the backward only
while a region holds them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves

from remat.profiling.region_record import RegionRecord, Storages
from remat.profiling.step_memory import BackwardSpan, StepMemory
from remat.solver.shared_input import SharedInput

__all__ = [
    "SharedInputs",
    "first_region_shared_bytes",
    "freed_before_peak",
    "in_order",
    "made_before_chain",
    "shared_gradient_bytes",
    "shared_in_step",
    "shared_inputs",
]


@dataclass(frozen=True, slots=True)
class SharedInputs:
    """Inputs that several regions take and no region makes (an attention mask, rotary
    tables, positions; an encoder's output for every decoder layer), by storage.

    Attributes:
        sizes: their bytes.
        takers: the regions that take each (indices, ascending).
        saved_by: the regions whose autograd saves each when they store.
        made_by: the region whose output each is (``-1``: made outside the regions).
    """

    sizes: dict[int, int]
    takers: dict[int, tuple[int, ...]]
    saved_by: dict[int, tuple[int, ...]]
    made_by: dict[int, int]


def shared_inputs(recs: Sequence[RegionRecord], made_before: Collection[int] = ()) -> SharedInputs:
    """Take the inputs that several regions take out of every region's inputs and saved
    tensors: they are counted once, as the chain's shared inputs, not once per region
    that holds or saves them (:class:`SharedInputs`). Made outside the regions, or by a
    region before them all (T5's first block makes the position bias the others take and
    hand back: not their output either). So is an input a
    later region alone takes that was made before the chain (``made_before``, storage
    keys: rotary tables only the last layer uses): live from the chain's start, whatever
    the plan, it is not that region's to keep."""
    takers: dict[int, list[int]] = {}
    for i, rec in enumerate(recs):
        for key in rec.input.keys:
            takers.setdefault(key, []).append(i)
    makers = {k: _maker(recs, k) for k in takers}
    shared = {
        k
        for k, who in takers.items()
        if (makers[k] == -1 and (len(who) > 1 or (who[0] > 0 and k in made_before)))
        or (len(who) > 1 and makers[k] is not None and -1 < makers[k] < who[0])
    }
    sizes = {k: recs[takers[k][0]].input_sizes[k] for k in shared}
    saved_by = {k: tuple(i for i in takers[k] if k in recs[i].saved) for k in shared}
    for rec in recs:  # a taker that hands it back (T5's blocks) does not make it again
        keys, total = rec.output
        through = keys & shared & rec.input.keys
        rec.output = Storages(keys - through, total - sum(sizes[k] for k in through))
    for rec in recs:
        keys, total = rec.input
        common = keys & shared
        rec.input = Storages(keys - common, total - sum(rec.input_sizes[k] for k in common))
        for k in common:
            rec.input_sizes.pop(k)
            rec.saved.pop(k, None)
    return SharedInputs(
        sizes=sizes,
        takers={k: tuple(takers[k]) for k in shared},
        saved_by=saved_by,
        made_by={k: makers[k] for k in shared},
    )


def _maker(recs: Sequence[RegionRecord], key: int) -> int | None:
    """The one region whose output ``key`` is, the others that output it handing back
    their input unchanged (``-1``: no region outputs it; ``None``: several make or write
    it, as an in-place ReLU rewrites the Linear's output it takes)."""
    outputs = [i for i, rec in enumerate(recs) if key in rec.output.keys]
    made = [i for i in outputs if key not in recs[i].passed_keys]
    if not outputs:
        return -1
    return made[0] if len(made) == 1 else None


def shared_gradient_bytes(
    shared: SharedInputs, recs: Sequence[RegionRecord], calls: Sequence[Any], step: StepMemory
) -> list[int]:
    """Per region, the gradients of shared inputs accumulating beside its backward.

    A shared input's gradient builds up from its last taker's backward (which makes the
    first part, in its own measured transient) until whatever made it runs backward: the
    regions below its last taker, down to the first whose forward had not ended when it
    was made (``StepMemory.inputs_made_after_region``; all of them when it was made
    before the chain). Only an input a gradient reached counts (``inputs_with_gradient``):
    zamba2's layers ignore the embeddings they are handed, which never get one."""
    reached = set().union(*(rec.inputs_with_gradient for rec in recs))
    out = [0] * len(recs)
    for key, nbytes in shared.sizes.items():
        if key not in reached:
            continue
        first, last = shared.takers[key][0], shared.takers[key][-1]
        made_after = min(
            (step.inputs_made_after_region.get(at, -1) for at in _positions(calls, first, key)),
            default=-1,
        )
        # the region that made it takes its gradient in its own measured backward
        for j in range(max(made_after, shared.made_by[key]) + 1, last):
            out[j] += nbytes
    return out


def _positions(calls: Sequence[Any], region: int, key: int) -> set[tuple[int, int]]:
    """Where the storage ``key`` sits in ``region``'s recorded call: (region, leaf) pairs."""
    return {
        (region, i)
        for i, t in enumerate(tree_leaves(calls[region]))
        if isinstance(t, Tensor) and t.untyped_storage()._cdata == key
    }


def made_before_chain(calls: Sequence[Any], step: StepMemory) -> set[int]:
    """The storages of the regions' inputs the measured step had made before the chain."""
    leaves = [tree_leaves(call) for call in calls]
    return {
        leaves[i][p].untyped_storage()._cdata
        for i, p in step.inputs_made_before_chain
        if i < len(leaves) and p < len(leaves[i]) and isinstance(leaves[i][p], Tensor)
    }


def first_region_shared_bytes(shared: SharedInputs) -> int:
    """The bytes of the shared inputs the first region takes (in its measured input)."""
    return sum(n for k, n in shared.sizes.items() if shared.takers[k][0] == 0)


def shared_in_step(
    shared: SharedInputs, calls: Sequence[Any], step: StepMemory, saved_outside: set[int]
) -> tuple[tuple[SharedInput, ...], int, int]:
    """The chain's shared inputs, and the bytes of those the measured step had made before
    the chain and of those it still held at the chain's backward. One still held then is
    held outside the regions unless regions alone save it: none outside does
    (``saved_outside``, the storages ops outside the regions save) and the step let it go
    by the end of its backward. One not found in its first taker's call counts as made
    later and held outside (an upper bound). One that only regions hold, the first that
    saves it frees in its backward: how much lower that backward peaks for it
    (``freed_before_peak``)."""
    fields, made_before, live = {}, 0, 0
    for key, nbytes in shared.sizes.items():
        at = _positions(calls, shared.takers[key][0], key)
        is_live = not at or bool(at & step.inputs_live_at_chain_backward)
        only_regions = (
            shared.saved_by[key]
            and key not in saved_outside
            and not at & step.inputs_live_after_backward
        )
        made_before += nbytes if at & step.inputs_made_before_chain else 0
        live += nbytes if is_live else 0
        fields[key] = {
            "nbytes": nbytes,
            "takers": shared.takers[key],
            "saved_by": shared.saved_by[key],
            "held_outside": is_live and not (at and only_regions),
            "made_by": shared.made_by[key],
        }
    firsts: dict[int, list[int]] = {}  # the first region saving each held by regions alone
    for key, f in fields.items():
        if f["saved_by"] and not f["held_outside"]:
            firsts.setdefault(f["saved_by"][0], []).append(key)
    for region, keys in firsts.items():
        spans = step.backward_spans[region] if region < len(step.backward_spans) else None
        # in an order of their own, which breaks ties between inputs freed together
        keys.sort(key=lambda k: (fields[k]["takers"], fields[k]["saved_by"], shared.sizes[k]))
        positions = {k: _positions(calls, shared.takers[k][0], k) for k in keys}
        freed = freed_before_peak(spans or (), positions, shared.sizes)
        for key in keys:
            fields[key]["freed_before_peak"] = freed.get(key, 0)
    out = [SharedInput(**f) for f in fields.values()]
    return in_order(out), made_before, live


def freed_before_peak(
    spans: Sequence[BackwardSpan],
    positions: dict[int, set[tuple[int, int]]],
    sizes: dict[int, int],
) -> dict[int, int]:
    """How much lower a stored region's backward (``spans``, from the measured step) peaks
    because it frees the shared inputs (``positions``: where each sits, by storage) part-way
    than it would with them held throughout, split between them in the order it frees
    them (ties in the order of ``positions``): each the drop that freeing it adds to those
    freed before. Together they are the whole drop, exactly; one it does not free gets
    nothing."""
    cut: dict[int, int] = {}  # per input it frees, the first span without it
    for key, at in positions.items():
        j = next((j for j, span in enumerate(spans) if span.freed & at), None)
        if j is not None:
            cut[key] = j
    order = sorted(cut, key=cut.__getitem__)

    def held_peak(held: Sequence[int]) -> int:
        # the backward's peak with ``held`` live throughout: each counted from its cut on
        return max(
            span.peak + sum(sizes[k] for k in held if cut[k] <= j) for j, span in enumerate(spans)
        )

    out: dict[int, int] = {}
    below = held_peak(()) if spans else 0
    for n, key in enumerate(order):
        above = held_peak(order[: n + 1])
        out[key] = above - below
        below = above
    return out


def in_order(shared: Sequence[SharedInput]) -> tuple[SharedInput, ...]:
    """Shared inputs in an order of their own (not of storage addresses, which differ
    between runs and devices): a meta profile then equals a CPU one."""
    return tuple(
        sorted(
            shared,
            key=lambda t: (
                t.takers,
                t.saved_by,
                t.nbytes,
                t.held_outside,
                t.made_by,
                t.freed_before_peak,
            ),
        )
    )
