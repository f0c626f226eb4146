"""Your own model on remat's command line: a factory returning (model, inputs[, loss_fn]).

    remat bench --model examples/08_my_model.py:build --model-arg layers=6
    remat plan --model examples/08_my_model.py:build --budget 50% --verify --json plan.json
    remat bench --model examples/08_my_model.py:build --configs plan:plan.json

``inputs`` is a tensor, a tuple (positional) or, as here, a dict (keyword inputs); remat moves
them and the model to ``--device``/``--dtype``. Without ``loss_fn`` the loss is the model's
``output.loss``, else the sum of its first floating output.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class Regressor(nn.Module):
    def __init__(self, features: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))  # the checkpoint units
        self.head = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
        h = self.embed(features)
        for block in self.blocks:
            h = block(h)
        return (self.head(h).squeeze(-1) - target) ** 2  # per-token squared error


def build(layers: int = 4, width: int = 256, batch: int = 32, tokens: int = 128):
    model = Regressor(features=32, width=width, layers=layers)
    inputs = {"features": torch.randn(batch, tokens, 32), "target": torch.randn(batch, tokens)}
    return model, inputs, lambda errors: errors.mean()  # (model, keyword inputs, its loss)
