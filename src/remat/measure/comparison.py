"""Named tensors (gradients, buffers) compared within ``torch.testing.assert_close``'s
tolerances for their dtype: the one comparison the bench, ``remat plan --verify`` and
:func:`remat.verify_plan` use.
"""

from __future__ import annotations

import math

import torch

__all__ = ["close", "compare_tensors"]


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """``actual`` is within ``assert_close``'s tolerances of ``expected``."""
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError:
        return False
    return True


def compare_tensors(
    reference: dict[str, torch.Tensor | None], other: dict[str, torch.Tensor | None]
) -> tuple[bool, float, list[str]]:
    """Compare named tensors (gradients, buffers) with ``torch.testing.assert_close``.

    Returns:
        ``(match, max_diff, mismatched)``: whether every tensor is within the dtype's
        tolerances, the largest absolute element difference (a tensor missing on one side
        counts as zeros there; a shape mismatch as infinite), and the names that differ.
    """
    max_diff, mismatched = 0.0, []
    for name in dict.fromkeys([*reference, *other]):
        a, b = other.get(name), reference.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            diff = (a if a is not None else b).double().abs().max().item()
        elif a.shape != b.shape:
            diff = math.inf
        else:
            diff = (a.double() - b.double()).abs().max().item()
            if close(a, b):
                max_diff = max(max_diff, diff)
                continue
        mismatched.append(name)
        max_diff = max(max_diff, diff)
    return not mismatched, max_diff, mismatched
