"""Memory in slots: every byte count of a chain rounded *up* to a multiple of the
resolution (and the budget down), so that a plan that fits at the resolution fits in bytes.
When all sizes share a divisor that gives few enough slots, that divisor is the resolution
and the rounding is exact."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import reduce

from remat.solver.problem import Chain

__all__ = ["byte_counts", "discretize", "resolution_for"]


def byte_counts(chain: Chain) -> list[int]:
    """Every byte count of ``chain`` the DP reads."""
    out = []
    for r in chain.regions:
        out += [r.input_bytes, r.saved_bytes, r.output_bytes, r.transient_bytes]
        out += [r.forward_extra_bytes, r.later_gradient_bytes, r.output_gradient]
        out.append(r.unsaved_input_bytes)
        out += [
            x
            for x in (r.recompute_forward_transient_bytes, r.recompute_transient_bytes)
            if x is not None
        ]
        out += [x for o in r.options for x in (o.kept_bytes, o.backward_extra_bytes)]
    out.append(chain.tail_bytes)
    return out


def resolution_for(chain: Chain, budget: int, resolution_bytes: int | None, slots: int) -> int:
    """``resolution_bytes`` if given, else the sizes' common divisor where it leaves at
    most ``slots`` slots under ``budget``, else the budget over ``slots``."""
    if resolution_bytes is not None:
        if isinstance(resolution_bytes, bool) or not isinstance(resolution_bytes, int):
            raise TypeError(f"resolution_bytes must be an int, got {resolution_bytes!r}")
        if resolution_bytes < 1:
            raise ValueError(f"resolution_bytes must be >= 1, got {resolution_bytes}")
        return resolution_bytes
    g = reduce(math.gcd, byte_counts(chain), 0) or 1
    return g if budget // g <= slots else max(1, -(-budget // slots))


def discretize(chain: Chain, resolution: int) -> Chain:
    """The chain with every byte count rounded up to whole ``resolution`` slots."""

    def up(x: int) -> int:
        return -(-x // resolution)

    def up_or_none(x: int | None) -> int | None:
        return None if x is None else up(x)

    regions = []
    for r in chain.regions:
        opts = tuple(
            replace(o, kept_bytes=up(o.kept_bytes), backward_extra_bytes=up(o.backward_extra_bytes))
            for o in r.options
        )
        regions.append(
            replace(
                r,
                input_bytes=up(r.input_bytes),
                saved_bytes=up(r.saved_bytes),
                output_bytes=up(r.output_bytes),
                transient_bytes=up(r.transient_bytes),
                options=opts,
                forward_transient_bytes=up(r.forward_extra_bytes),
                recompute_forward_transient_bytes=up_or_none(r.recompute_forward_transient_bytes),
                recompute_transient_bytes=up_or_none(r.recompute_transient_bytes),
                later_gradient_bytes=up(r.later_gradient_bytes),
                output_gradient_bytes=up_or_none(r.output_gradient_bytes),
                # the unsaved part of the input rounds up, as every other count does
                saved_input_bytes=None
                if r.saved_input_bytes is None
                else up(r.input_bytes) - up(r.input_bytes - r.saved_input_bytes),
            )
        )
    return Chain(regions, tail_bytes=up(chain.tail_bytes))
