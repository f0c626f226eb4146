"""Shared inputs a stored region frees part-way through its backward: how much lower it
peaks (``freed_before_peak``), from the measured step's spans, and every plan of a model
whose first layer peaks after freeing them predicted to the byte."""

from __future__ import annotations

import torch
from torch import nn

import remat
from conftest import assert_predicted_to_the_byte, every_plan, mean_square
from remat.profiling.shared_inputs import freed_before_peak
from remat.profiling.step_memory import BackwardSpan


class _RotaryLayer(nn.Module):
    """Two sub-blocks, each a wide up-projection, a down-projection and a rotation by the
    tables the model hands every layer (``y * cos + flip(y) * sin``), as longcat_flash's
    layers run two attentions on the rotary tables: the products save the tables, and in
    the backward the first sub-block's product, which frees them when nothing else holds
    them, runs before its up-projection's large weight gradient is made."""

    def __init__(self, d: int, wide: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(d, wide) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(wide, d) for _ in range(2))

    def forward(self, x, cos, sin):
        for up, down in zip(self.ups, self.downs):
            y = down(torch.relu(up(x)))  # (B, d)
            x = x + y * cos + y.flip(-1) * sin
        return x


class _Rotary(nn.Module):
    """Rotary-like tables made before the layers from the input's positions (no gradient),
    handed to each layer."""

    def __init__(self, d: int, wide: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_RotaryLayer(d, wide) for _ in range(n))

    def forward(self, x):
        positions = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x)
        cos, sin = torch.cos(positions), torch.sin(positions)  # (B, d) each
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


def test_a_stored_first_saver_peaks_after_freeing_the_shared_tables():
    """Stored, the first layer is the last to hold the tables and frees them before its
    peak (its up-projections' gradients); recomputed, its checkpoint holds them through
    its backward. A plan storing the first layer and recomputing a later one was predicted
    with both tables live at that peak (512 B over the measured peak)."""
    torch.manual_seed(0)
    d, wide, n = 16, 256, 3
    model = _Rotary(d, wide, n)
    x = torch.randn(4, d, requires_grad=True)  # the weights' gradients make the peak
    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"layers.{i}" for i in range(n)])
    table = x.numel() * 4
    shared = [(t.takers, t.saved_by, t.nbytes, t.freed_before_peak) for t in prof.shared_inputs]
    # the positions, which the forward drops, and the two tables
    assert shared == [((), (), x.shape[-1] * 4, 0)] + [((0, 1, 2), (0, 1, 2), table, table)] * 2
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(n))


def test_freed_before_peak_splits_the_drop_in_the_order_the_inputs_are_freed():
    a, b = (0, 1), (0, 2)  # where each sits in the region's call
    sizes = {1: 20, 2: 10}
    spans = (
        BackwardSpan(frozenset(), 100),
        BackwardSpan(frozenset({a, (1, 1)}), 90),  # a freed (the next region took it too)
        BackwardSpan(frozenset({b}), 120),
    )
    # held, a would reach 90 + 20 and 120 + 20; b then 120 + 30: the peak 120 rises to 150
    assert freed_before_peak(spans, {1: {a}, 2: {b}}, sizes) == {1: 20, 2: 10}
    # freed after the peak: held or not, the backward peaks at 200
    late = (BackwardSpan(frozenset(), 200), BackwardSpan(frozenset({a}), 90))
    assert freed_before_peak(late, {1: {a}}, sizes) == {1: 0}
    # freed a little before a peak a little lower than the one it was part of
    near = (BackwardSpan(frozenset(), 100), BackwardSpan(frozenset({a}), 95))
    assert freed_before_peak(near, {1: {a}}, sizes) == {1: 15}
    # not freed in the region's backward (something else holds it), or not seen whole
    assert freed_before_peak(near, {2: {b}}, sizes) == {}
    assert freed_before_peak((), {1: {a}}, sizes) == {}
