"""A meta profile runs what the CPU runs, where PyTorch's meta kernel checks CUDA's limits:
``grouped_mm`` in float32 (mixture-of-experts layers) is refused on meta without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import remat

pytestmark = pytest.mark.skipif(
    not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm is newer"
)


class Experts(nn.Module):
    """Tokens sorted by expert, each group through its own weight (as transformers' MoE)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(4, 16, 32) / 4)
        self.down = nn.Parameter(torch.randn(4, 32, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        groups = self.up.shape[0]  # equal groups: offsets 8, 16, 24, 32
        offs = torch.arange(1, groups + 1, dtype=torch.int32, device=x.device)
        offs = offs * (flat.shape[0] // groups)
        h = F.grouped_mm(flat, self.up, offs=offs).relu()
        return F.grouped_mm(h, self.down, offs=offs).reshape(x.shape) + x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Experts() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _model(device: str) -> Model:
    torch.manual_seed(0)
    with torch.device(device):
        return Model()


def test_float32_grouped_mm_profiles_on_meta_as_on_the_cpu():
    x = torch.randn(2, 16, 16)

    def loss(y: torch.Tensor) -> torch.Tensor:  # a dense gradient: CPU's kernel needs one
        return y.pow(2).sum()

    cpu = remat.profile(_model("cpu"), x, loss_fn=loss, target_device="cpu")
    meta = remat.profile(_model("meta"), x, loss_fn=loss, target_device="cpu")
    fields = ("name", "input_bytes", "saved_bytes", "output_bytes", "transient_bytes")
    assert [[getattr(r, f) for f in fields] for r in meta.regions] == [
        [getattr(r, f) for f in fields] for r in cpu.regions
    ]
    assert [o.name for o in meta.regions[0].ops] == [o.name for o in cpu.regions[0].ops]
    assert "aten._grouped_mm.default#0" in [o.name for o in meta.regions[0].ops]
    assert meta.step_peak_bytes == cpu.step_peak_bytes
