"""What one measured training step saw around the chain (``StepMemory``, with its
backward's stretches as ``BackwardSpan``): written by ``step_watch.StepWatch``, returned by
``step.measure_step`` and read by the profiler, ``gradients`` and ``shared_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["BackwardSpan", "StepMemory"]


class BackwardSpan(NamedTuple):
    """A stretch of one region's backward in the measured step, between two frees of the
    regions' inputs (``StepMemory.backward_spans``)."""

    freed: frozenset[tuple[int, int]]  # the inputs, (region, position), freed just before it
    peak: int  # the highest new bytes in it


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMemory:
    """One un-checkpointed training step's memory around the chain, new bytes only.

    Attributes:
        peak: the step's peak.
        tail_peak: the peak from the end of the last region's forward until its output's
            gradient is ready (the head and the loss, forward and backward).
        before_chain_peak: the peak before the first region's forward starts.
        at_chain_start: what is live when the first region's forward starts, its input
            included (``first_input``).
        first_input: the first region's tensor inputs, new storages only.
        at_chain_backward: what is live when the last region's output gradient is ready,
            that gradient included (``output_gradient``): besides what the chain and the
            parts before it hold, what the head's backward leaves (its parameters'
            gradients, a tied weight's gradient waiting for its other use); ``None``: not
            seen.
        after_chain_peak: the peak once the first region's input gradient is ready (what
            runs before the chain, backward; every parameter gradient is live).
        loss: the loss and the gradient ``backward()`` starts from (as large), live until
            the backward returns.
        inputs_live_at_chain_backward: which regions' tensor inputs, as (region, position
            in ``tree_leaves((args, kwargs))``) on its first call, are still held when the
            last region's output gradient is ready: the inputs regions share may be freed
            by then, or held by the model.
        inputs_made_before_chain: the same pairs for the inputs made before the first
            region's forward started (live then, so in ``at_chain_start``).
        inputs_live_after_backward: the same pairs for the inputs still held once the
            backward returned: something besides autograd's graph holds them.
        inputs_made_after_region: for the same pairs, the last region whose forward had
            ended when the input was made (``-1``: none had).
        before_chain_at_chain_backward: what of ``at_chain_start`` is still live when the
            last region's output gradient is ready, the regions' inputs aside (``None``:
            not seen): what ran before the chain may free some of what it made (a value
            the forward drops once the chain has started).
        beside_region_backward: per region, what the head, the loss and the backward so
            far had made and still held when its output's gradient was ready, that
            gradient aside (``None``: not seen): the gradients of the parameters and shared
            inputs that ran backward before it, and what the head leaves. Checkpointing
            changes none of it.
        left_between_regions: per region, at the same moment, what ops between the
            regions still held: what they made in the chain's forward and the regions'
            outputs only they take, the regions' inputs aside. A projection between two
            stacks of regions frees its saved input once it has run backward.
        before_region_backward: per region, how far the step rose above what it held
            then between the end of the next region's backward and the start of its own:
            those ops' backward (``None``: not seen; the last region's is the tail's).
        backward_spans: per region, its backward, from the end of the next region's (the
            ops between them included; the last region's: from its start) until its input's
            gradient is ready, cut where the regions' inputs are freed
            (:class:`BackwardSpan`; ``None``: not seen whole). A stored region frees the
            inputs only its autograd saves part-way through its backward (rotary tables
            the first layer's attention saves), which may then peak without them.
    """

    peak: int
    tail_peak: int = 0
    before_chain_peak: int = 0
    at_chain_start: int = 0
    first_input: int = 0
    after_chain_peak: int = 0
    at_chain_backward: int | None = None
    output_gradient: int = 0
    loss: int = 0
    inputs_live_at_chain_backward: frozenset[tuple[int, int]] = frozenset()
    inputs_made_before_chain: frozenset[tuple[int, int]] = frozenset()
    inputs_live_after_backward: frozenset[tuple[int, int]] = frozenset()
    inputs_made_after_region: dict[tuple[int, int], int] = field(default_factory=dict)
    before_chain_at_chain_backward: int | None = None
    beside_region_backward: tuple[int | None, ...] = ()
    left_between_regions: tuple[int | None, ...] = ()
    before_region_backward: tuple[int | None, ...] = ()
    backward_spans: tuple[tuple[BackwardSpan, ...] | None, ...] = ()
