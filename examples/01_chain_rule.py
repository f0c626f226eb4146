"""The chain rule by hand: what backward needs from forward, on a 3-function toy.

Three functions in a chain, f1(x) = x², f2(a) = a³, f3(b) = b⁴, and a loss (y − 10)².
Backward multiplies the local derivatives, and each one needs a value from forward
(f1' needs x, f2' needs a, f3' needs b): those are the *activations* autograd stores.
Checkpointing keeps fewer of them and recomputes the rest in backward.

The script computes the gradient by hand, checks it against autograd, then recomputes it
from x alone (nothing stored but the input), the idea behind activation checkpointing.

Run: python examples/01_chain_rule.py [--x 1.05]
"""

from __future__ import annotations

import argparse

import torch


def f1(x: torch.Tensor) -> torch.Tensor:
    return x**2


def f2(a: torch.Tensor) -> torch.Tensor:
    return a**3


def f3(b: torch.Tensor) -> torch.Tensor:
    return b**4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x", type=float, default=1.05, help="the input value")
    x0 = parser.parse_args().x

    # Forward, keeping every intermediate (what autograd does by default).
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    a = f1(x)
    b = f2(a)
    y = f3(b)
    loss = (y - 10) ** 2

    # Backward by hand: dL/dx = dL/dy · f3'(b) · f2'(a) · f1'(x); each factor needs a stored value.
    with torch.no_grad():
        dl_dy = 2 * (y - 10)
        by_hand = dl_dy * (4 * b**3) * (3 * a**2) * (2 * x)

    (autograd,) = torch.autograd.grad(loss, x)

    # Checkpointed: store only x, recompute a and b when backward needs them.
    with torch.no_grad():
        a_re = f1(x)
        b_re = f2(a_re)
        y_re = f3(b_re)
        recomputed = 2 * (y_re - 10) * (4 * b_re**3) * (3 * a_re**2) * (2 * x)

    print(f"x = {x0}   y = x^24 = {y.item():.6f}   loss = {loss.item():.6f}")
    print(f"dL/dx by hand      {by_hand.item(): .12f}")
    print(f"dL/dx by autograd  {autograd.item(): .12f}")
    print(f"dL/dx recomputed   {recomputed.item(): .12f}   (stored only x)")
    torch.testing.assert_close(by_hand, autograd)
    torch.testing.assert_close(recomputed, autograd)
    print("hand-written, autograd and recomputed gradients agree")


if __name__ == "__main__":
    main()
