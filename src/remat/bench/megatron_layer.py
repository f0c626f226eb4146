"""The transformer layer of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4), to check remat's byte count against the paper's.

Megatron's layer: LayerNorm, one QKV projection, the attention core (Q Kᵀ, softmax, dropout
on the probabilities, attention over V) written out as the math kernel, the output
projection, dropout, residual; LayerNorm, MLP 4h with GeLU, dropout, residual. Inputs are
``(s, b, h)`` as in Megatron. The paper counts per layer, in 16-bit activations with
one-byte dropout masks, ``s·b·h·(34 + 5·a·s/h)`` bytes, and ``34·s·b·h`` when the attention
core is recomputed (``checkpoint_modules=["core"]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionCore", "MegatronLayer", "paper_bytes"]


class AttentionCore(nn.Module):
    """Q Kᵀ / √d, softmax, dropout, @ V: the part the paper's selective recompute reruns."""

    def __init__(self, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
        probs = self.dropout(F.softmax(scores, dim=-1))
        return probs @ v


class MegatronLayer(nn.Module):
    """One pre-norm GPT layer as Megatron builds it; ``forward(x)`` with ``x`` of ``(s, b, h)``."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"MegatronLayer: hidden {hidden} is not a multiple of heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.core = AttentionCore(heads, dropout)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)
        self.mlp_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        s, b, h = x.shape
        d = h // self.heads
        # (s, b, 3h) -> three (b, a, s, d) views of the one projection output
        q, k, v = self.qkv(self.ln1(x)).view(s, b, 3, self.heads, d).permute(2, 1, 3, 0, 4)
        context = self.core(q, k, v)  # (b, a, s, d)
        x = x + self.attn_dropout(self.proj(context.permute(2, 0, 1, 3).reshape(s, b, h)))
        return x + self.mlp_dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def paper_bytes(s: int, b: int, h: int, a: int, recompute_core: bool = False) -> int:
    """The paper's activation bytes per layer (its equations 1 and 2 with t = 1)."""
    if recompute_core:
        return 34 * s * b * h
    return s * b * h * 34 + 5 * a * s * s * b


def layer_input(s: int, b: int, h: int, dtype: torch.dtype = torch.float16) -> Tensor:
    """The layer's input on meta: nothing is allocated."""
    return torch.empty(s, b, h, dtype=dtype, device="meta")
