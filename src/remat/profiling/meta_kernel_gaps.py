"""Meta kernels for what a real CPU run computes but PyTorch's meta kernel refuses.

Some meta kernels check the limits of the CUDA kernel rather than the op's: ``_grouped_mm``
(``torch.nn.functional.grouped_mm``, which transformers' mixture-of-experts layers call on
CPU in float32) accepts only bfloat16 on meta, so a meta profile of such a model would fail
where the CPU run it stands for succeeds. :func:`meta_kernel_gaps` answers those calls with
an output of the shape and dtype the real kernel returns (allocated as the CPU kernel
allocates it: one dense tensor). Autograd has already recorded the op above the dispatch
modes, so what it saves for backward is the real op's, and the backward's own calls of the
op come here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["meta_kernel_gaps"]

aten = torch.ops.aten


def _grouped_mm_shape(mat_a: Tensor, mat_b: Tensor, offs: Tensor | None) -> list[int]:
    """The output's shape (as ``torch._meta_registrations`` computes it)."""
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        groups = offs.size(0) if offs is not None else 1
        return [groups, mat_a.size(0), mat_b.size(1)]
    if mat_a.dim() == 2:
        return [mat_a.size(0), mat_b.size(-1)]
    if mat_b.dim() == 2:
        return [mat_a.size(1), mat_b.size(1)]
    return [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]


def _grouped_mm(
    mat_a: Tensor,
    mat_b: Tensor,
    offs: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | None:
    if mat_a.dtype == mat_b.dtype == torch.bfloat16:
        return None  # what the meta kernel accepts: its answer (CUDA's padded strides too)
    shape = _grouped_mm_shape(mat_a, mat_b, offs)
    return torch.empty(shape, dtype=out_dtype or mat_a.dtype, device=mat_a.device)


_GAPS: dict[Any, Any] = {aten._grouped_mm.default: _grouped_mm}


class _MetaKernelGaps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gap = _GAPS.get(func)
        if gap is not None and any(isinstance(a, FakeTensor) for a in args):
            # inside the handler this mode is off: the factory makes a fake tensor below
            out = gap(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_kernel_gaps() -> Iterator[None]:
    """Inside a ``FakeTensorMode`` (entered already), run the ops of ``_GAPS`` whose meta
    kernel would refuse the real run's dtypes (see the module docstring)."""
    with _MetaKernelGaps():
        yield
