"""remat.sqrt / remat.segments: Chen's √n segments run as one checkpointed region each."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from conftest import tiny_gpt

B, T, C = 2, 16, 32
BLOCK_INPUT = B * T * C * 4


def gpt(layers=9, dropout=0.1):
    return tiny_gpt(batch=B, n_layers=layers, seq_len=T, d_model=C, dropout=dropout)


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


class ConvBN(nn.Module):
    """Conv-BN blocks whose buffers feed the computation: a step counter scales the output,
    so a block recomputed with a counter advanced twice gives another gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps += 1
        return torch.tanh(self.bn(self.conv(x))) * self.steps


class Stack(nn.Module):
    """Blocks called the way real models call them: all of them, only the first ``depth``
    (early exit), some skipped (LayerDrop), or with an op between two of them."""

    def __init__(self, n=9, block=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            (block or (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh())))() for _ in range(n)
        )

    def forward(self, x, depth=None, skip=(), scale_after=None):
        for i, block in enumerate(self.blocks[:depth]):
            if i in skip:
                continue
            x = block(x)
            if i == scale_after:
                x = x * 1.5
        return x


def _step(model, x, **call):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x, **call)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()], list(model.buffers())


@pytest.mark.parametrize("policy", [remat.sqrt(), remat.segments(4), remat.segments(2)])
def test_buffers_change_once_in_every_block_of_a_segment(policy):
    torch.manual_seed(0)
    reference = Stack(4, ConvBN)
    model = copy.deepcopy(reference)
    remat.apply(model, policy)
    x = torch.randn(2, 3, 5, 5)
    want, got = _step(reference, x), _step(model, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [b.bn.num_batches_tracked.item() for b in model.blocks] == [1, 1, 1, 1]


CALLS = {
    "all": {},
    "stops-early": {"depth": 2},
    "stops-inside-a-segment": {"depth": 5},
    "skips": {"skip": (1, 4)},
    "skips-segment-heads": {"skip": (0, 3, 6)},
    "op-between-blocks": {"scale_after": 4},
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_segments_follow_the_models_own_calls(call):
    torch.manual_seed(0)
    reference = Stack()
    model = copy.deepcopy(reference)
    remat.apply(model, remat.sqrt())  # 9 blocks: 3 segments of 3
    x = torch.randn(3, 4)
    torch.testing.assert_close(
        _step(model, x, **CALLS[call]), _step(reference, x, **CALLS[call]), rtol=0, atol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x, **CALLS[call]), reference(x, **CALLS[call]))


def test_a_segment_cut_short_keeps_only_its_input():
    """Blocks 0 and 1 of the segment 0-2 ran: one region, keeping block 0's input."""
    model = Stack(9, lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh()))
    remat.apply(model, remat.sqrt())
    x = torch.randn(32, 64, requires_grad=True)
    with remat.MemoryTracker(count_existing=[model, x]) as tracker:
        out = model(x, depth=2)
    out.sum().backward()
    assert tracker.saved_bytes == x.numel() * 4  # block 1's input is recomputed


def test_segments_bad_input():
    with pytest.raises(ValueError, match="length must be a positive integer"):
        remat.segments(0)
    with pytest.raises(ValueError, match="filter= cannot be combined with Segments"):
        remat.apply(gpt().model, remat.sqrt(), filter="blocks.*")


def test_in_place_relu_inside_a_segment_is_exact():
    """Inside a segment an in-place ReLU writes an input the segment recomputes: the
    recomputation writes it again, as the forward did."""
    torch.manual_seed(0)
    reference = Stack(4, lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)))
    reference.blocks[0] = nn.Sequential(nn.Linear(4, 4))  # the segment's own input stays
    model = copy.deepcopy(reference)
    remat.apply(model, remat.segments(4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(_step(model, x), _step(reference, x), rtol=0, atol=0)


class _ExpOrDouble(nn.Module):
    def __init__(self, write: bool):
        super().__init__()
        self.write = write

    def forward(self, x):
        # exp saves its output; sin its input (so the recomputation runs this block too)
        return x.mul_(2).sin() if self.write else torch.exp(x)


def test_a_block_overwriting_what_the_block_before_saved_raises_as_without_remat():
    """exp saved its output, which the next block then writes: plain PyTorch raises in
    backward; inside a segment the recomputation writes it again after handing it over,
    and the recomputed tensor is checked the same way."""
    for wrap in (False, True):
        model = nn.Module()
        model.blocks = nn.ModuleList([_ExpOrDouble(False), _ExpOrDouble(True)])
        if wrap:
            remat.apply(model, remat.segments(2))
        x = torch.randn(3, requires_grad=True)
        y = model.blocks[1](model.blocks[0](x * 1.0))
        with pytest.raises(RuntimeError, match="modified by an in-?place operation"):
            y.sum().backward()
