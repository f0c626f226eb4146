"""remat.sqrt / remat.segments: Chen's √n segments run as one checkpointed region each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import remat
from remat.models import build_workload

B, T, C = 2, 16, 32
BLOCK_INPUT = B * T * C * 4


def gpt(layers=9, dropout=0.1):
    return build_workload(
        "gpt",
        batch=B,
        n_layers=layers,
        seq_len=T,
        d_model=C,
        n_heads=4,
        vocab_size=64,
        dropout=dropout,
    )


def grads(workload):
    torch.manual_seed(0)
    workload.model.zero_grad(set_to_none=True)
    workload.loss().backward()
    return [p.grad for p in workload.model.parameters()]


def saved_bytes(workload):
    with remat.MemoryTracker(
        module=workload.model, count_existing=[workload.model, *workload.inputs]
    ) as tracker:
        loss = workload.loss()
    loss.backward()
    return tracker.saved_bytes, tracker.saved_bytes_by_module


@pytest.mark.parametrize("policy", [remat.sqrt(), remat.segments(2), remat.segments(9)])
def test_segments_gradients_equal(policy):
    reference, checkpointed = gpt(), gpt()
    remat.apply(checkpointed.model, policy)
    torch.testing.assert_close(grads(checkpointed), grads(reference), rtol=0, atol=0)


def test_sqrt_keeps_one_input_per_segment():
    _, by_module = saved_bytes(gpt(dropout=0.0))
    none_total, _ = saved_bytes(gpt(dropout=0.0))
    blocks = sum(by_module[f"blocks.{i}"] for i in range(9))
    workload = gpt(dropout=0.0)
    remat.apply(workload.model, remat.sqrt())  # 9 blocks: 3 segments of 3
    total, _ = saved_bytes(workload)
    assert total == none_total - blocks + 3 * BLOCK_INPUT


class Irregular(nn.Module):
    """Does something between its blocks: segments cannot be chained."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * 2
        return x


def test_follower_called_out_of_chain_raises():
    model = Irregular()
    remat.apply(model, remat.sqrt())
    with pytest.raises(remat.CheckpointError, match="was not called in order"):
        model(torch.randn(2, 4, requires_grad=True))


def test_segments_bad_input():
    with pytest.raises(ValueError, match="length must be a positive integer"):
        remat.segments(0)
    with pytest.raises(ValueError, match="filter= cannot be combined with Segments"):
        remat.apply(gpt().model, remat.sqrt(), filter="blocks.*")
