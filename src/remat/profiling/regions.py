"""Which modules are candidate regions by default: the children of the repeated-block lists,
else the model's children with every ``nn.Sequential`` opened.
"""

from __future__ import annotations

from torch import nn

from remat.policy.selectors import block_lists

__all__ = ["default_regions"]


def default_regions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of the repeated-block lists, else the model's direct children with every
    ``nn.Sequential`` among them opened up into its own children (recursively): a
    Sequential is a chain already, and its layers are regions the planner can tell apart
    (three big blocks leave it little to choose from)."""
    lists = block_lists(model)
    if lists:
        return [
            (f"{fqn}.{name}" if fqn else name, child)
            for fqn, blocks in lists
            for name, child in blocks.named_children()
        ]
    return _opened(model, "")


def _opened(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        if isinstance(child, nn.Sequential) and len(child):
            out += _opened(child, f"{fqn}.")
        else:
            out.append((fqn, child))
    return out
