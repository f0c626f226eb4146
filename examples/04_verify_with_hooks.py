"""Which layers store activations? The tutorial's forward-hook check, then the same in bytes.

The tutorial registers a forward hook on every layer and prints whether its output requires
grad. With blocks 1–2 under the old reentrant ``torch.utils.checkpoint``, their layers run
under ``no_grad`` and print ``False``: a hint that no graph (and no activation) is kept there,
but it says nothing about how many bytes are. ``remat.saved_activations`` answers that: per
module, the bytes autograd keeps for backward, with and without blocks 1–2 checkpointed
(here with ``remat.checkpoint``; a checkpointed block keeps only its input).

Run: python examples/04_verify_with_hooks.py [--batch 3072]
"""

from __future__ import annotations

import argparse
import functools
import warnings

import torch
import torch.utils.checkpoint as tuc

import remat
from remat.bench.workloads import TutorialMLP, build_workload


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
            h = tuc.checkpoint(model.block1, x, use_reentrant=True)
            h = tuc.checkpoint(model.block2, h, use_reentrant=True)
            model.block3(h)
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

    for name in ("block1", "block2"):  # checkpoint the blocks' forward, hooks still fire
        block = model.get_submodule(name)
        block.forward = functools.partial(remat.checkpoint, block.forward)
    print("\nremat.saved_activations, blocks 1-2 under remat.checkpoint:")
    print(remat.saved_activations(model, x))


if __name__ == "__main__":
    main()
