"""Which layers store activations? The tutorial's forward-hook check, then the same in bytes.

The tutorial registers a forward hook on every layer and prints whether its output requires
grad. With blocks 1–2 under the old reentrant ``torch.utils.checkpoint``, their layers run
under ``no_grad`` and print ``False``: a hint that no graph (and no activation) is kept there,
but it says nothing about how many bytes are. ``remat.saved_activations`` answers that: per
module, the bytes autograd keeps for backward, with and without blocks 1–2 checkpointed as
one region, as the tutorial does (here with ``remat.checkpoint``: the region keeps only block
1's input).

Run: python examples/04_verify_with_hooks.py [--batch 3072]
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.utils.checkpoint as tuc

import remat
from remat.bench.workloads import TutorialMLP, build_workload


class CheckpointedMLP(TutorialMLP):
    """The tutorial's checkpointed model: blocks 1-2 as one region, then block 3."""

    def _checkpoint_layers(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(remat.checkpoint(self._checkpoint_layers, x))


def hook_check(model: TutorialMLP, x: torch.Tensor) -> None:
    """The tutorial's check: print ``output.requires_grad`` for every leaf layer."""
    handles = [
        layer.register_forward_hook(
            lambda mod, args, out, name=name: print(
                f"  {name:<10} {type(mod).__name__:<7} output.requires_grad={out.requires_grad}"
            )
        )
        for name, layer in model.named_modules()
        if not list(layer.children())
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant checkpoint warns about the input
            blocks_1_2 = lambda t: model.block2(model.block1(t))  # noqa: E731
            model.block3(tuc.checkpoint(blocks_1_2, x, use_reentrant=True))
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3072)
    batch = parser.parse_args().batch
    w = build_workload("mlp", batch=batch)
    model, (x,) = w.model, w.inputs

    print("forward hooks, blocks 1-2 under reentrant torch.utils.checkpoint:")
    hook_check(model, x)

    print(f"\nremat.saved_activations, no checkpointing (batch {batch}):")
    print(remat.saved_activations(model, x))

    checkpointed = CheckpointedMLP()
    checkpointed.load_state_dict(model.state_dict())
    print("\nremat.saved_activations, blocks 1-2 as one region under remat.checkpoint:")
    print(remat.saved_activations(checkpointed, x))


if __name__ == "__main__":
    main()
