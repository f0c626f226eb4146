"""Demo and benchmark models: the tutorial's MLP, a GPT-style stack and a small conv net.

Each model comes with sample inputs, targets and a loss as a :class:`Workload`, so the
benchmark, the planner and the tests all run the same training step. ``blocks`` names the
repeated modules, the usual candidates for checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "GPT",
    "MODEL_NAMES",
    "ConvNet",
    "GPTConfig",
    "TutorialMLP",
    "Workload",
    "build_workload",
]


class TutorialMLP(nn.Module):
    """The tutorial's MLP: three blocks, 3000→512→700, 700→512→700, 700→512→10.

    The ReLUs of blocks 1–2 are in place (``nn.ReLU(inplace=True)``), block 3's is not: the
    structure whose byte counts match the tutorial's figures (CPU, batch 3072, forward peak,
    weights and input included: 91.14 MB plain, 72.27 MB with blocks 1–2 as one checkpointed
    region, 78.56 MB per block). With ``inplace=False`` the one-region figure is 74.58 MB:
    block 1's output is held by the call while block 2's last ReLU makes a second 8.6 MB
    tensor beside its input; an in-place ReLU in block 3 lowers the plain figure to 85.10 MB.
    """

    def __init__(
        self,
        in_features: int = 3000,
        hidden: int = 512,
        width: int = 700,
        classes: int = 10,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace),
            nn.Linear(hidden, width),
            nn.ReLU(inplace),
        )
        self.block2 = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace), nn.Linear(hidden, width), nn.ReLU(inplace)
        )
        self.block3 = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(x)))


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of the GPT-style stack (defaults: the engine and planner benchmarks' model)."""

    vocab_size: int = 1024
    seq_len: int = 256
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 12
    mlp_ratio: int = 4
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"GPTConfig: d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
            )
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A nanoGPT-style decoder: token ids (B, T) to logits (B, T, vocab)."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"GPT: sequence length {T} exceeds seq_len={self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


class ConvBlock(nn.Module):
    """Residual conv block with BatchNorm, whose running stats expose recompute side effects."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ConvNet(nn.Module):
    """A small residual conv net for 3x32x32 images."""

    def __init__(self, channels: int = 32, n_blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(n_blocks))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, C, H, W)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


@dataclass(kw_only=True)
class Workload:
    """A model with the inputs, targets and loss of one training step.

    Attributes:
        name: the model's name (one of ``MODEL_NAMES``, ``hf:<arch>`` or a user factory).
        model: the module, on ``device`` with ``dtype``.
        inputs: positional inputs of ``model``.
        targets: what ``loss_fn`` compares the output with (``None``: the loss needs none).
        loss_fn: ``(output, targets) -> scalar``.
        blocks: qualified names of the repeated blocks, the default checkpoint candidates.
        kwargs: keyword inputs of ``model`` (a transformers batch: ``input_ids=``...).
    """

    name: str
    model: nn.Module
    inputs: tuple[Any, ...]
    targets: Tensor | None
    loss_fn: Callable[[Any, Tensor | None], Tensor]
    blocks: tuple[str, ...] = field(default=())
    kwargs: dict[str, Any] = field(default_factory=dict)

    def loss(self) -> Tensor:
        """Run the forward pass and return the scalar loss."""
        return self.loss_of(self.model(*self.inputs, **self.kwargs))

    def loss_of(self, out: Any) -> Tensor:
        """The scalar loss of the model's output ``out`` (``loss_fn`` for ``remat.profile``)."""
        return self.loss_fn(out, self.targets)

    @property
    def tensors(self) -> list[Tensor]:
        """Every tensor the model is called with, positional and keyword."""
        return [t for t in tree_leaves((self.inputs, self.kwargs)) if isinstance(t, Tensor)]

    @property
    def device(self) -> torch.device:
        first = next(iter(self.tensors), None)
        if first is not None:
            return first.device
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    @property
    def batch(self) -> int | None:
        """The leading size of the first input (``None`` for a model without inputs)."""
        first = next(iter(self.tensors), None)
        return int(first.shape[0]) if first is not None and first.dim() else None


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _class_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets)


MODEL_NAMES = ("mlp", "gpt", "convnet")
DEFAULT_BATCH = {"mlp": 3072, "gpt": 8, "convnet": 32}


def build_workload(
    name: str,
    *,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **sizes: Any,
) -> Workload:
    """Build one of the demo models with deterministic weights and inputs.

    Args:
        name: ``"mlp"`` (the tutorial's), ``"gpt"`` or ``"convnet"``.
        batch: batch size; the model's default when ``None`` (mlp 3072, gpt 8, convnet 32).
        device: where the model and data live (``"meta"`` works too).
        dtype: floating point dtype of the parameters and float inputs.
        seed: seeds weights and data, so two builds are identical.
        **sizes: model size options (``GPTConfig`` fields for gpt; ``channels``,
            ``n_blocks`` for convnet; ``in_features``, ``hidden``, ``width``, ``inplace`` for mlp).

    Returns:
        A :class:`Workload`.

    Raises:
        ValueError: unknown model name or size option.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    batch = DEFAULT_BATCH[name] if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, inputs, targets, loss_fn, blocks = _BUILDERS[name](batch, gen, sizes)
        except TypeError as e:
            raise ValueError(f"model {name!r}: bad size option ({e})") from None
    model = model.to(device=device, dtype=dtype)
    inputs = tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in inputs
    )
    return Workload(
        name=name,
        model=model,
        inputs=inputs,
        targets=targets.to(device),
        loss_fn=loss_fn,
        blocks=blocks,
    )


def _build_mlp(batch: int, gen: torch.Generator, sizes: dict[str, Any]):
    model = TutorialMLP(**sizes)
    x = torch.randn(batch, model.block1[0].in_features, generator=gen)
    y = torch.randint(0, model.block3[-1].out_features, (batch,), generator=gen)
    return model, (x,), y, _class_loss, ("block1", "block2", "block3")


def _build_gpt(batch: int, gen: torch.Generator, sizes: dict[str, Any]):
    cfg = GPTConfig(**sizes)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen)
    blocks = tuple(f"blocks.{i}" for i in range(cfg.n_layers))
    return model, (idx,), targets, _lm_loss, blocks


def _build_convnet(batch: int, gen: torch.Generator, sizes: dict[str, Any]):
    model = ConvNet(**sizes)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, model.head.out_features, (batch,), generator=gen)
    blocks = tuple(f"blocks.{i}" for i in range(len(model.blocks)))
    return model, (x,), y, _class_loss, blocks


_BUILDERS = {"mlp": _build_mlp, "gpt": _build_gpt, "convnet": _build_convnet}


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements in ``model``."""
    return sum(p.numel() for p in model.parameters())
