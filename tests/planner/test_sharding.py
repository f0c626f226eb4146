"""One rank of FSDP over N ranks: sharded state, gathered units, reduce-scattered gradients."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import remat
from remat.cli import main
from remat.planner.sharding import shard_profile, sharded_state
from remat.planner.training_state import training_state


class _Stack(nn.Module):
    def __init__(self, width: int = 32, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)  # the root unit: in no region
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x).tanh()
        return x


def _grads(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_later_regions_gradients_are_a_rank_s_share_during_backward():
    model, x = _Stack(), torch.randn(16, 8)
    prof = remat.profile(model, x)
    four = shard_profile(prof, model, 4)
    layer = _grads(model.layers[0])
    for i, (whole, rank) in enumerate(zip(prof.regions, four.regions, strict=True)):
        later = layer * (len(prof.regions) - 1 - i)
        assert whole.transient_bytes - rank.transient_bytes == later - later // 4
        assert whole.later_gradient_bytes - rank.later_gradient_bytes == later - later // 4
        if whole.recompute_transient_bytes is not None:
            rerun = whole.recompute_transient_bytes - rank.recompute_transient_bytes
            assert rerun == later - later // 4
        assert (whole.saved_bytes, whole.input_bytes) == (rank.saved_bytes, rank.input_bytes)
    # once the chain's backward is done every region's gradients are reduce-scattered
    every = layer * len(prof.regions)
    assert prof.after_chain_peak_bytes - four.after_chain_peak_bytes == every - every // 4
    assert four.step_peak_bytes <= prof.step_peak_bytes and four.meta["world_size"] == 4
    assert shard_profile(prof, model, 1) is prof
    with pytest.raises(ValueError, match="positive integer"):
        shard_profile(prof, model, 0)


def test_a_rank_holds_its_shards_and_the_units_in_flight():
    model = _Stack().to(torch.bfloat16)
    state = training_state(model, "adamw")
    regions = [f"layers.{i}" for i in range(4)]
    rank = sharded_state(state, model, regions, world_size=8)
    params = sum(p.numel() for p in model.parameters())
    # the fp32 master shard is the parameter: 4 + 8 bytes per element, over 8 ranks
    assert rank.shards == -(-params * 12 // 8)
    assert rank.gathered == _grads(model.embed) + 2 * _grads(model.layers[0])
    assert rank.total == rank.shards + rank.gathered
    assert sharded_state(state, model, regions, 1).total == state.total
    assert "FSDP over 8 ranks" in rank.describe(0, 1)


def test_plan_per_rank_on_the_cli(capsys):
    argv = ["plan", "--model", "gpt", "--layers", "4", "--device", "meta", "--target", "h100",
            "--dtype", "bfloat16", "--optimizer", "adamw", "--budget", "300MB",
            "--headroom", "0"]  # fmt: skip
    assert main([*argv, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "FSDP over 4 ranks" in out
    verdict = re.search(r"fits: ([\d.]+) MB of 300\.00 MB per rank", out)
    assert verdict and float(verdict.group(1)) <= 300, out
    assert main(["plan", "--model", "gpt", "--budget", "50%", "--world-size", "2"]) == 2
    assert "--world-size 2" in capsys.readouterr().err


@pytest.mark.slow
def test_a_llama_shaped_model_on_meta_plans_per_rank(capsys):
    """transformers' mask code asks its tensors for values; on meta it runs on fake ones."""
    pytest.importorskip("transformers")
    argv = ["plan", "--model", "hf:llama", "--layers", "2", "--d-model", "256", "--heads",
            "4", "--seq-len", "512", "--batch", "1", "--device", "meta", "--target", "h100",
            "--world-size", "8", "--optimizer", "adamw", "--dtype", "bfloat16",
            "--budget", "1GB", "--headroom", "0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "FSDP over 8 ranks" in capsys.readouterr().out
