"""A profile's costs as ``torch.compile`` pays them: only compute-bound ops cost to recompute.

In eager mode recomputing a GELU, a norm or a residual add costs a pass over memory each, and
the profile measures that. Inductor fuses such ops into the kernels around them, so in a
compiled backward recomputing them costs next to nothing; what costs is the matmuls,
convolutions and attention. PyTorch's min-cut partitioner reasons the same way (its
``compute_intensive_ops``, which it never recomputes by choice). :func:`compiled_costs`
keeps the measured (or predicted) cost of those ops and sets every other op's to zero, and
drops the op-level engines' fixed overhead, which compiled code does not have: the planner
then keeps the outputs of the expensive ops and recomputes the rest, as the partitioner would.
"""

from __future__ import annotations

import dataclasses
import re

from remat.profiling.profile_data import Profile

__all__ = ["COMPUTE_BOUND_OPS", "compiled_costs", "is_compute_bound"]

# torch._functorch.partitioners.get_default_op_list().compute_intensive_ops, with the
# attention kernels of the CPU and cuDNN, batched and grouped matmuls beside them.
COMPUTE_BOUND_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_grouped_mm",
        "_scaled_mm",
        "convolution",
        "_convolution",
        "convolution_backward",
        "cudnn_convolution",
        "mkldnn_convolution",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "upsample_bilinear2d",
    }
)

_NAME = re.compile(r"^(?:aten[.:]+)?([A-Za-z0-9_]+)")


def is_compute_bound(op_name: str) -> bool:
    """Whether an op of a profile (``"aten.addmm.default#3"``) is one Inductor does not
    fuse away: a matmul, a convolution or an attention kernel."""
    match = _NAME.match(op_name)
    return bool(match) and match.group(1) in COMPUTE_BOUND_OPS


def compiled_costs(profile: Profile) -> Profile:
    """``profile`` with each region's op costs as a compiled backward pays them: compute-
    bound ops as measured, every other op free, no op-level overhead. A region's
    recomputation then costs its compute-bound ops (``Region.recompute_cost`` is the sum of
    its rerun ops' costs); its forward cost is left as measured."""
    regions = []
    for region in profile.regions:
        ops = tuple(
            op if is_compute_bound(op.name) else dataclasses.replace(op, cost=0.0)
            for op in region.ops
        )
        regions.append(dataclasses.replace(region, ops=ops, op_overhead=0.0))
    return dataclasses.replace(profile, regions=tuple(regions))
