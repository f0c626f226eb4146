"""What the step holds beside each region's backward, and inputs part-saved: every plan of
these models is predicted to the byte."""

from __future__ import annotations

import torch
from torch import nn

import remat
from conftest import assert_predicted_to_the_byte, every_plan, mean_square


class _Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _TwoStacks(nn.Module):
    """Two stacks of regions with a wide layer between them, outside every region (an
    encoder's final projection): its weight gets its gradient only once the second stack
    has run backward, so it is not live beside that stack's backward."""

    def __init__(self, d: int, wide: int, n: int = 2) -> None:
        super().__init__()
        self.first = nn.ModuleList(_Layer(d) for _ in range(n))
        self.up, self.down = nn.Linear(d, wide), nn.Linear(wide, d)
        self.second = nn.ModuleList(_Layer(d) for _ in range(n))

    def forward(self, x):
        for layer in self.first:
            x = layer(x)
        x = self.down(torch.relu(self.up(x)))
        for layer in self.second:
            x = layer(x)
        return x


def test_a_gradient_made_between_regions_counts_from_where_it_appears():
    torch.manual_seed(0)
    d, wide, n = 16, 512, 2
    model = _TwoStacks(d, wide, n)
    x = torch.randn(8, d)
    names = [f"first.{i}" for i in range(n)] + [f"second.{i}" for i in range(n)]
    prof = remat.profile(model, x, loss_fn=mean_square, regions=names)
    between = sum(p.numel() * 4 for m in (model.up, model.down) for p in m.parameters())
    # the layers between the stacks run backward after the second stack: their gradients
    # sit beside the first stack's backward only
    first, second = prof.regions[n - 1], prof.regions[n]
    assert second.later_gradient_bytes < between <= first.later_gradient_bytes
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(len(prof.regions)))


class _PairLayer(nn.Module):
    """Takes the previous layer's output and a side value made from it; saves the output
    (its Linear's input) but not the side value, which it only adds. A wide temporary made
    without autograd puts the step's peak in the forward, where the input is live."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, side=None):
        with torch.no_grad():
            scale = x.unsqueeze(-1).expand(-1, -1, 32).clone().mean(-1)
        h = self.fc(x) + scale
        if side is not None:
            h = h + side
        y = x + torch.tanh(h)
        return y, y * 0.5


class _Pairs(nn.Module):
    def __init__(self, d: int, n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_PairLayer(d) for _ in range(n))

    def forward(self, x):
        side = None
        for layer in self.layers:
            x, side = layer(x, side)
        return x + side


def test_an_input_saved_in_part_holds_only_the_rest_on_top():
    torch.manual_seed(0)
    d, n = 64, 4
    model = _Pairs(d, n)
    x = torch.randn(128, d)
    prof = remat.profile(model, x, loss_fn=mean_square, regions=[f"layers.{i}" for i in range(n)])
    one = 128 * d * 4
    later = prof.regions[1]
    assert (later.input_bytes, later.saved_input_bytes, later.input_saved) == (2 * one, one, False)
    assert later.to_region().unsaved_input_bytes == one
    assert_predicted_to_the_byte(model, (x,), prof, every_plan(len(prof.regions)))
