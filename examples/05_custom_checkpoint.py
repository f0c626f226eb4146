"""Step 5 of the tutorial: checkpointing as a ``torch.autograd.Function``, done right.

The tutorial re-implements checkpointing as an autograd Function whose backward returns
``torch.autograd.grad(outputs, inputs, grad_outputs)``. The weights inside the checkpointed
blocks are not inputs of that Function, so they silently receive no gradient, and when the
input batch does not require grad nothing in those blocks is trained at all.

This script runs the tutorial's 3-block MLP (3000→512→700, 700→512→700, 700→512→10,
batch 3072) three ways — without checkpointing, with the tutorial's Function on blocks 1–2
as one region (``checkpoint(self._checkpoint_layers, x)``), and with
``remat.CheckpointFunction`` on the same region — and compares the loss and every parameter
gradient with the un-checkpointed model. remat's must match bitwise; the tutorial's misses
the gradients of blocks 1–2. Exits non-zero if remat's does not match.

Run: ``python examples/05_custom_checkpoint.py [--batch 3072]``
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys

import torch

import remat
from remat.bench.workloads import TutorialMLP


class TutorialCheckpointFunction(torch.autograd.Function):
    """The tutorial's Function, kept as it was to show its bug: inputs-only gradients."""

    @staticmethod
    def forward(ctx, run_function, *args):
        ctx.run_function = run_function
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.run_function(*inputs)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs) if wanted else ())
        return (None, *(next(grads) if x.requires_grad else None for x in inputs))


def checkpoint_layers(model: TutorialMLP, x: torch.Tensor) -> torch.Tensor:
    """The tutorial's ``_checkpoint_layers``: blocks 1-2, checkpointed as one region."""
    return model.block2(model.block1(x))


def train_step(model: TutorialMLP, x: torch.Tensor, y: torch.Tensor, how: str) -> torch.Tensor:
    region = functools.partial(checkpoint_layers, model)  # self._checkpoint_layers
    if how == "none":
        h = region(x)
    elif how == "tutorial":
        h = TutorialCheckpointFunction.apply(region, x)
    else:  # remat: the same call, with remat's Function
        h = remat.CheckpointFunction.apply(region, x)
    loss = torch.nn.functional.cross_entropy(model.block3(h), y)
    loss.backward()
    return loss.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3072)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = TutorialMLP()
    x = torch.randn(args.batch, 3000)  # a data batch: does not require grad
    y = torch.randint(0, 10, (args.batch,))

    results = {}
    for how in ("none", "tutorial", "remat"):
        model = copy.deepcopy(base)
        loss = train_step(model, x, y, how)
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[how] = (loss, grads)

    ref_loss, ref_grads = results["none"]
    print(f"{'parameter':<18}{'tutorial Function':>22}{'remat.CheckpointFunction':>28}")
    remat_ok = True
    for name, ref in ref_grads.items():
        cells = []
        for how in ("tutorial", "remat"):
            grad = results[how][1][name]
            if grad is None:
                cells.append("NO GRADIENT")
                ok = False
            else:
                diff = (grad - ref).abs().max().item()
                ok = diff == 0.0
                cells.append("equal" if ok else f"max diff {diff:.2e}")
            if how == "remat":
                remat_ok &= ok
        print(f"{name:<18}{cells[0]:>22}{cells[1]:>28}")
    for how in ("tutorial", "remat"):
        same = torch.equal(results[how][0], ref_loss)
        remat_ok &= same or how == "tutorial"
        print(f"loss with {how} checkpointing equals the un-checkpointed loss: {same}")
    missing = sum(g is None for g in results["tutorial"][1].values())
    print(
        f"\nThe tutorial's Function left {missing} of {len(ref_grads)} parameters without a "
        "gradient; remat's matches every gradient bitwise."
        if remat_ok
        else "\nremat's gradients do NOT match: this is a bug."
    )
    return 0 if remat_ok else 1


if __name__ == "__main__":
    sys.exit(main())
