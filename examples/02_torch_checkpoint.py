"""The tutorial's 3-block MLP with blocks 1–2 under ``torch.utils.checkpoint``.

Blocks 1 and 2 run as ONE checkpointed region, as in the tutorial
(``checkpoint(self._checkpoint_layers, x)``): they drop their activations in forward, only
block 1's input is kept, and both are recomputed in backward; block 3 runs normally. The
script checks that loss and every gradient equal the un-checkpointed model's (bitwise on
CPU float32: the same kernels run in the same order), and shows the classic pitfall of the
old default ``use_reentrant=True``: when the region's input does not require grad, the
checkpointed blocks' parameters silently get no gradient.

Run: python examples/02_torch_checkpoint.py [--batch 3072] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.utils.checkpoint as tuc
from torch import nn

from remat.bench.workloads import TutorialMLP, build_workload


def forward(model: TutorialMLP, x: torch.Tensor, *, checkpointed: bool, reentrant: bool = False):
    if not checkpointed:
        return model(x)

    def checkpoint_layers(t: torch.Tensor) -> torch.Tensor:  # the tutorial's _checkpoint_layers
        return model.block2(model.block1(t))

    h = tuc.checkpoint(checkpoint_layers, x, use_reentrant=reentrant)
    return model.block3(h)


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3072)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    w = build_workload("mlp", batch=args.batch, device=args.device)
    (x,) = w.inputs
    ref, ckpt = w.model, copy.deepcopy(w.model)

    loss_ref = w.loss_fn(forward(ref, x, checkpointed=False), w.targets)
    loss_ref.backward()
    loss_ck = w.loss_fn(forward(ckpt, x, checkpointed=True), w.targets)
    loss_ck.backward()

    torch.testing.assert_close(loss_ck, loss_ref, rtol=0, atol=0)
    for (name, g_ref), g_ck in zip(grads(ref).items(), grads(ckpt).values()):
        torch.testing.assert_close(g_ck, g_ref, rtol=0, atol=0, msg=f"gradient of {name}")
    print(f"batch {args.batch} on {args.device}: loss {loss_ref.item():.6f}")
    print("use_reentrant=False: loss and all gradients equal the plain model's, bitwise")

    # The pitfall: reentrant checkpoint with an input that does not require grad.
    old = copy.deepcopy(w.model)
    old.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.loss_fn(forward(old, x, checkpointed=True, reentrant=True), w.targets).backward()
    missing = [n for n, g in grads(old).items() if g is None]
    print(f"use_reentrant=True: {len(missing)} parameters got no gradient: {', '.join(missing)}")
    if caught:
        print(f"  (torch warned: {str(caught[0].message).splitlines()[0]})")


if __name__ == "__main__":
    main()
