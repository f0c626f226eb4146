"""compiled_costs: a profile priced as a compiled backward pays, matmuls and attention as
profiled, the ops Inductor fuses free."""

from __future__ import annotations

import pytest

import remat
from conftest import mean_square, tiny_gpt
from remat.profiling.compiled_costs import compiled_costs, is_compute_bound


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("aten.addmm.default#0", True),
        ("aten.mm.default#12", True),
        ("aten._scaled_dot_product_flash_attention_for_cpu.default#0", True),
        ("aten.convolution.default#1", True),
        ("aten.gelu.default#0", False),
        ("aten.native_layer_norm.default#1", False),
        ("aten.add.Tensor#0", False),
        ("aten.mmx.default#0", False),  # a prefix is not the op
    ],
)
def test_compute_bound_ops_are_torch_s(name, bound):
    assert is_compute_bound(name) is bound


def test_only_compute_bound_ops_keep_their_cost():
    workload = tiny_gpt(n_layers=2, seq_len=32, d_model=64)
    prof = remat.profile(workload.model, *workload.inputs, loss_fn=mean_square)
    compiled = compiled_costs(prof)
    for eager, region in zip(prof.regions, compiled.regions, strict=True):
        assert region.op_overhead == 0.0 and region.cost == eager.cost
        for before, after in zip(eager.ops, region.ops, strict=True):
            assert after.cost == (before.cost if is_compute_bound(before.name) else 0.0)
        chain_region = compiled.to_chain().regions[compiled.regions.index(region)]
        matmuls = sum(o.cost for o in region.rerun_ops)
        assert chain_region.rerun_cost == pytest.approx(min(region.cost, matmuls))
        # keeping every matmul and attention output leaves nothing that costs to recompute
        cheapest = min(chain_region.options, key=lambda o: o.recompute_cost)
        assert cheapest.recompute_cost == pytest.approx(0.0, abs=1e-12)
        assert cheapest.kept_bytes < region.saved_bytes
