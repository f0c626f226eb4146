"""Run a model on meta as the target device would: its kernels decide what backward keeps.

Two ops keep different tensors for backward depending on the device, and on the meta device
(or under ``FakeTensorMode``) PyTorch runs neither as a GPU would:

- ``F.dropout`` in training: CUDA runs the fused ``native_dropout``, whose mask is one byte
  per element (``bool``); the CPU and meta multiply by a mask kept in the input's dtype
  (2 or 4 bytes).
- ``F.scaled_dot_product_attention``: meta always decomposes into the math kernel, which
  keeps the s x s attention matrices. A GPU runs flash attention (bf16/fp16, no mask) or the
  memory-efficient kernel (a mask, or float32), which keep the output and a float32
  log-sum-exp per query row; the CPU runs its own flash kernel without dropout.

:func:`target_kernels`, for tensors without data only, calls the kernel the target
would: ``native_dropout`` for a CUDA target, and the SDPA backend PyTorch's own selection
picks there (for a CUDA target, the flash, efficient and math rules of ``sdp_utils.cpp``
for sm80 and newer; for the CPU, ``torch._fused_sdp_choice`` itself). Tensors with data run
unchanged: what they keep is measured, not predicted.

Not modelled: cuDNN attention, which recent PyTorch prefers on sm90 with a new cuDNN (it
keeps what flash keeps: the output and a float32 statistic per query row); head dims that
are padded to a multiple of 8; and the efficient kernel's padding of a mask to 16 columns.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend

from remat.targets.devices import Target

__all__ = ["cuda_sdpa_backend", "target_kernels"]

aten = torch.ops.aten
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _no_data(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_meta or isinstance(t, FakeTensor))


def cuda_sdpa_backend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> SDPBackend:
    """The backend ``F.scaled_dot_product_attention`` takes on an sm80+ GPU (flash, then
    memory-efficient, then math), from PyTorch's ``sdp_utils.cpp`` rules for dense inputs."""
    d_q, d_k, d_v = query.shape[-1], key.shape[-1], value.shape[-1]
    low = query.dtype in (torch.float16, torch.bfloat16)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return SDPBackend.MATH
    same_heads = query.shape[1] == key.shape[1] == value.shape[1]
    heads_divide = query.shape[1] % key.shape[1] == 0 and key.shape[1] == value.shape[1]
    if (
        low
        and attn_mask is None
        and d_q == d_k == d_v <= 256
        and not (is_causal and query.shape[-2] != key.shape[-2])
        and heads_divide
    ):
        return SDPBackend.FLASH_ATTENTION
    alignment = 8 if low else 4
    if (
        query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and d_q == d_k
        and d_q % alignment == 0
        and d_v % alignment == 0
        and same_heads
    ):
        return SDPBackend.EFFICIENT_ATTENTION
    return SDPBackend.MATH


def _cpu_sdpa_backend(q: Tensor, k: Tensor, v: Tensor, opts: dict[str, Any]) -> SDPBackend:
    """PyTorch's own CPU choice, asked with stand-ins of the same shapes that hold one row."""

    def proxy(t: Tensor) -> Tensor:  # requires grad as ``t`` does: a mask that does rules
        row = torch.zeros(t.shape[-1], dtype=t.dtype, device="cpu")  # out the flash kernel
        return row.requires_grad_(t.requires_grad).expand(t.shape)

    mask = opts.get("attn_mask")
    # Real CPU tensors, or the meta kernel would answer; and no mode above the fake one
    # (the profiler's op recorder, the memory tracker) sees these stand-ins as the model's ops.
    with torch._C._DisableTorchDispatch():
        choice = torch._fused_sdp_choice(
            proxy(q),
            proxy(k),
            proxy(v),
            attn_mask=None if mask is None else proxy(mask),
            dropout_p=opts.get("dropout_p", 0.0),
            is_causal=opts.get("is_causal", False),
            scale=opts.get("scale"),
            enable_gqa=opts.get("enable_gqa", False),
        )
    return SDPBackend(choice)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as the fused kernels take it: 0 where kept, -inf where masked, by the
    ops PyTorch's ``convert_boolean_attn_mask`` runs (so the profile lists the same ops)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    neg_inf = torch.scalar_tensor(-math.inf, dtype=dtype, device=mask.device)
    zero = torch.scalar_tensor(0.0, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg_inf)


def _sdpa(kernels: str, q: Tensor, k: Tensor, v: Tensor, opts: dict[str, Any]) -> Tensor | None:
    """The attention output from the target's kernel; ``None``: PyTorch's own call is it."""
    mask, p = opts.get("attn_mask"), opts.get("dropout_p", 0.0)
    causal, scale = opts.get("is_causal", False), opts.get("scale")
    if kernels == "cpu":
        if _cpu_sdpa_backend(q, k, v, opts) != SDPBackend.FLASH_ATTENTION:
            return None  # the math kernel: meta decomposes it as the CPU does
        mask = _float_mask(mask, q.dtype)
        return aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, p, causal, attn_mask=mask, scale=scale
        )[0]
    backend = cuda_sdpa_backend(q, k, v, mask, causal)
    if backend == SDPBackend.FLASH_ATTENTION:
        return aten._scaled_dot_product_flash_attention(q, k, v, p, causal, False, scale=scale)[0]
    if backend == SDPBackend.EFFICIENT_ATTENTION:
        grad = q.requires_grad or k.requires_grad or v.requires_grad
        mask = _float_mask(mask, q.dtype)
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, grad, p, causal, scale=scale
        )[0]
    if p > 0:  # math with CUDA's one-byte dropout mask
        drop = torch.empty(*q.shape[:-1], k.shape[-2], dtype=torch.bool, device=q.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "dropout mask should only be used for testing"
            return aten._scaled_dot_product_attention_math(
                q,
                k,
                v,
                mask,
                p,
                causal,
                dropout_mask=drop,
                scale=scale,
                enable_gqa=opts.get("enable_gqa", False),
            )[0]
    return None


def _sdpa_for(kernels: str, original: Any) -> Any:
    def scaled_dot_product_attention(query, key, value, *args, **kwargs):
        if all(_no_data(t) for t in (query, key, value)):
            out = _sdpa(kernels, query, key, value, dict(zip(_SDPA_ARGS, args), **kwargs))
            if out is not None:
                return out
        return original(query, key, value, *args, **kwargs)

    return scaled_dot_product_attention


def _dropout_for(original: Any, names: tuple[str, ...]) -> Any:
    def dropout(input, *args, **kwargs):
        opts = dict(zip(names, args), **kwargs)
        p, train = opts.get("p", 0.5), opts.get("training", opts.get("train", True))
        # CUDA fuses only the out-of-place call (``dropout_`` keeps its dtype's mask)
        if _no_data(input) and train and p > 0 and not opts.get("inplace", False):
            return torch.native_dropout(input, p, True)[0]
        return original(input, *args, **kwargs)

    return dropout


@contextlib.contextmanager
def target_kernels(target: Target | None) -> Iterator[None]:
    """Run tensors without data through ``target``'s kernels (nothing when ``None``).

    The functions are swapped where models look them up (``torch.nn.functional`` and
    ``torch``) for the duration, rather than intercepted by a ``TorchFunctionMode``: a mode
    is switched off while it handles ``loss.backward()``, so a checkpoint's recomputation in
    backward would run the other kernels and keep other tensors than its forward did. A
    model that bound ``scaled_dot_product_attention`` at import time keeps the meta kernels.
    """
    if target is None:
        yield
        return
    swaps = [
        (
            F,
            "scaled_dot_product_attention",
            _sdpa_for(target.kernels, F.scaled_dot_product_attention),
        )
    ]
    if target.kernels == "cuda":
        swaps += [
            (F, "dropout", _dropout_for(F.dropout, ("p", "training", "inplace"))),
            (torch, "dropout", _dropout_for(torch.dropout, ("p", "train"))),
        ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, new in swaps:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)
