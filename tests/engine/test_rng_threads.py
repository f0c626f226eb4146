"""Recomputation while another thread draws from the same global RNG.

A data-augmentation thread calling ``torch.rand`` in a loop advances the generator between
the state a checkpoint captures and the region's dropout, and again during the
recomputation: the recomputed mask is then not the forward's. Each step must either give
the gradients of the forward's own mask, bitwise, or raise :class:`remat.CheckpointError`
naming the cause, never a wrong gradient.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import remat
from remat.engine import determinism

STEPS = 40
P = 0.5


class _RecordingDropout(nn.Dropout):
    """Dropout keeping each call's output: the first of a step is the forward's."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.outputs.append(y.detach())
        return y


class _FixedMask(nn.Module):
    """Dropout with a given mask, computed as CPU dropout computes it (``x * noise``, the
    noise being 0 or ``1 / (1 - p)``), so gradients through it are bitwise the same."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.noise = mask.to(torch.float32).div_(1 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.noise


class _Model(nn.Module):
    def __init__(self, run: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.run = run
        self.inp = nn.Linear(16, 64)
        self.block = nn.Sequential(
            nn.Linear(64, 64), _RecordingDropout(P), nn.Tanh(), nn.Linear(64, 64)
        )
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run(self.block, self.inp(x)))


RUNS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "hooks": lambda block, h: remat.checkpoint(block, h),
    "hooks-values": lambda block, h: remat.checkpoint(block, h, determinism_check="values"),
    "function": lambda block, h: remat.checkpoint(block, h, engine="function"),
    "replay": lambda block, h: remat.ops("save-matmuls", engine="replay").run(block, (h,), {}),
    "tape": lambda block, h: remat.ops("save-matmuls", engine="tape").run(block, (h,), {}),
}


@pytest.fixture
def busy_rng() -> Iterator[None]:
    """A thread drawing from the global CPU generator in a tight loop."""
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(4096)

    # Speed only, the race is as frequent either way (each draw releases the GIL while it
    # runs): the training thread waits for the GIL at most 0.1 ms, and its ops do not spin
    # up intra-op workers that compete with the drawing thread for the cores.
    interval, workers = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(1e-4)
    torch.set_num_threads(1)
    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        torch.set_num_threads(workers)


def _grads(model: nn.Module) -> dict[str, Any]:
    return {name: p.grad for name, p in model.named_parameters()}


def _forward_mask_grads(model: nn.Module, dropout: _RecordingDropout, x: torch.Tensor) -> dict:
    """The oracle: the un-checkpointed model's gradients with the mask the forward drew (a
    dropout output is zero exactly where the mask is, its input being nonzero)."""
    reference = copy.deepcopy(model)
    reference.run = lambda block, h: block(h)
    reference.block[1] = _FixedMask(dropout.outputs[0] != 0, P)
    reference.zero_grad(set_to_none=True)
    reference(x).square().mean().backward()
    return _grads(reference)


@pytest.mark.parametrize("engine", list(RUNS))
def test_forward_mask_or_error_with_another_thread_drawing(engine, busy_rng):
    torch.manual_seed(0)
    model = _Model(RUNS[engine])
    dropout = model.block[1]
    inputs = torch.Generator().manual_seed(1)
    wrong, errors = [], 0
    for step in range(STEPS):
        dropout.outputs.clear()
        model.zero_grad(set_to_none=True)
        x = torch.randn(128, 16, generator=inputs)
        try:
            model(x).square().mean().backward()
        except remat.CheckpointError as error:
            assert "another thread" in str(error), str(error)
            errors += 1
            continue
        got, want = _grads(model), _forward_mask_grads(model, dropout, x)
        if not all(torch.equal(got[name], want[name]) for name in want):
            wrong.append(step)
    assert not wrong, (
        f"{engine}: steps {wrong} of {STEPS} got the gradients of another dropout mask than "
        f"the forward's, without an error ({errors} raised CheckpointError)"
    )


@pytest.mark.parametrize("engine", list(RUNS))
def test_quiet_rng_gives_the_forward_mask(engine):
    """Without another thread every step is exact: the check raises no false alarm."""
    torch.manual_seed(0)
    model = _Model(RUNS[engine])
    dropout = model.block[1]
    inputs = torch.Generator().manual_seed(1)
    for _ in range(5):
        dropout.outputs.clear()
        model.zero_grad(set_to_none=True)
        x = torch.randn(128, 16, generator=inputs)
        model(x).square().mean().backward()
        got, want = _grads(model), _forward_mask_grads(model, dropout, x)
        assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("n", [100, 10_000])
def test_the_after_draw_check_compares_where_a_float_tensor_is_zero(n):
    """A layer norm's mean and rstd are saved without grad after a dropout drew: rerun on
    a copy at another address, a vectorised reduction may change their last bits, which
    is no other draw. Another dropout mask changes where values are zero, which is."""
    torch.manual_seed(0)
    x = torch.randn(n) * (torch.rand(n) > 0.1)  # a dropout's output: zeros where dropped
    forward = determinism.record(x, "metadata", after_draw=True)
    rerun = torch.where(x == 0, x, torch.nextafter(x, x + 1))  # every nonzero one bit off
    last_bits = determinism.record(rerun, "metadata", after_draw=True)
    assert last_bits.same_as(forward)
    redrawn = x * (torch.rand(n) > 0.1)
    assert not determinism.record(redrawn, "metadata", after_draw=True).same_as(forward)
    mask = torch.rand(n) > 0.1  # a bool mask: its bits
    other = mask.clone()
    other[n // 2] = ~other[n // 2]
    record = determinism.record(mask, "metadata", after_draw=True)
    assert not determinism.record(other, "metadata", after_draw=True).same_as(record)
