"""activation_share: a plan's kept activations over those kept with every region stored,
torch.compile's activation_memory_budget for the same plan."""

from __future__ import annotations

import pytest

from remat.solver import Chain, Region, plan_from_choices
from remat.solver.compile_budget import activation_share


def chain() -> Chain:
    # each region: input 10 B, saves 100 B (its input among them), output 10 B
    regions = [
        Region(
            name=f"r{i}",
            fwd_cost=1.0,
            input_bytes=10,
            saved_bytes=100,
            output_bytes=10,
            input_saved=True,
        )
        for i in range(4)
    ]
    return Chain(regions=regions)


def test_share_of_stored_recomputed_and_segment_plans() -> None:
    c = chain()
    stored = plan_from_choices(c, ["store"] * 4)
    everything = sum(r.kept_bytes for r in stored.regions)
    assert activation_share(c, stored) == 1.0
    half = plan_from_choices(c, ["store", "recompute", "store", "recompute"])
    expected = sum(r.kept_bytes for r in half.regions) / everything
    assert activation_share(c, half) == pytest.approx(expected)
    assert 0 < activation_share(c, half) < 1
    # a segment over regions 0-2 keeps only region 0's input from forward to backward
    segment = plan_from_choices(c, ["recompute"] * 4, segments=[(0, 3)])
    kept = c.regions[0].input_bytes + segment.regions[3].kept_bytes
    assert activation_share(c, segment) == pytest.approx(kept / everything)


def test_share_of_another_chains_plan_is_refused() -> None:
    other = plan_from_choices(chain(), ["store"] * 4)
    short = Chain(regions=chain().regions[:3])
    with pytest.raises(ValueError, match="regions"):
        activation_share(short, other)
