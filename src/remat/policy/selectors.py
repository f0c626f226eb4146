"""Selectors: which modules become checkpointed regions.

Selectors answer "is this module a region?" and combine with ``&`` and ``|``; a bare
``(module, fqn) -> bool`` function, a module class or a glob string is a selector too.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Selector",
    "as_selector",
    "block_lists",
    "by_name",
    "by_type",
    "every",
    "sqrt_segment_length",
    "where",
]


class Selector:
    """Chooses the modules that become checkpointed regions."""

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every selected module, in ``named_modules`` order."""
        return [(fqn, m) for fqn, m in model.named_modules() if self.matches(m, fqn, model)]

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        raise NotImplementedError

    def __and__(self, other: Any) -> Any:
        if callable(getattr(other, "run_forward", None)):
            return NotImplemented  # a treatment: Treatment.__rand__ makes the Policy
        return _AllOf((self, as_selector(other)))

    def __rand__(self, other: Any) -> Any:
        return as_selector(other) & self

    def __or__(self, other: Any) -> Selector:
        return _AnyOf((self, as_selector(other)))

    def __ror__(self, other: Any) -> Selector:
        return as_selector(other) | self


@dataclass(frozen=True)
class _AllOf(Selector):
    parts: tuple[Selector, ...]

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = [{fqn for fqn, _ in part.select(model)} for part in self.parts]
        names = set.intersection(*chosen)
        return [(fqn, m) for fqn, m in model.named_modules() if fqn in names]


@dataclass(frozen=True)
class _AnyOf(Selector):
    parts: tuple[Selector, ...]

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        names = set().union(*({fqn for fqn, _ in part.select(model)} for part in self.parts))
        return [(fqn, m) for fqn, m in model.named_modules() if fqn in names]


@dataclass(frozen=True)
class by_type(Selector):
    """Modules that are instances of any of ``types`` (e.g. ``LlamaDecoderLayer``)."""

    types: tuple[type, ...]

    def __init__(self, *types: type) -> None:
        if not types or not all(isinstance(t, type) for t in types):
            raise TypeError(f"remat.by_type expects module classes, got {types!r}")
        object.__setattr__(self, "types", types)

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return isinstance(module, self.types)


@dataclass(frozen=True)
class by_name(Selector):
    """Modules whose qualified name matches any glob pattern (``"blocks.*"``, ``"*.mlp"``)."""

    patterns: tuple[str, ...]

    def __init__(self, *patterns: str) -> None:
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"remat.by_name expects glob patterns as strings, got {patterns!r}")
        object.__setattr__(self, "patterns", patterns)

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return bool(fqn) and any(fnmatch.fnmatchcase(fqn, p) for p in self.patterns)


@dataclass(frozen=True)
class where(Selector):
    """Modules for which ``predicate(module, fqn)`` is true."""

    predicate: Callable[[nn.Module, str], bool]

    def __post_init__(self) -> None:
        if not callable(self.predicate):
            raise TypeError(
                "remat.where: predicate must be a (module, fqn) -> bool function, got "
                f"{type(self.predicate).__name__} {self.predicate!r}"
            )

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return bool(self.predicate(module, fqn))


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList | nn.Sequential]]:
    """The model's repeated-block lists: ModuleLists (and Sequentials) of two or more
    modules of one type, outermost only (a list inside a block of another list is part of
    that block). A ModuleList of several layer types with a common base class of their own
    counts too: hybrid models mix attention and recurrent layers (transformers'
    ``GradientCheckpointingLayer``), where a Sequential of a Linear and a ReLU does not."""
    found: list[tuple[str, nn.ModuleList | nn.Sequential]] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1 and not (
            isinstance(module, nn.ModuleList) and _common_layer_base(list(module)) is not None
        ):
            continue
        if any(fqn.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((fqn, module))
    return found


def _common_layer_base(children: list[nn.Module]) -> type | None:
    """The most specific class all ``children`` are instances of, unless it is nn.Module."""
    for base in type(children[0]).__mro__:
        if base is nn.Module or base is object:
            return None
        if all(isinstance(child, base) for child in children):
            return base
    return None


@dataclass(frozen=True)
class every(Selector):
    """Every ``n``-th block of each repeated-block list (blocks ``offset``, ``offset + n``, …).

    ``every(1)`` is every block, the usual per-layer checkpointing; ``every(2)`` is Hugging
    Face's "every other layer".
    """

    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"remat.every: n must be a positive integer, got {self.n!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int):
            raise TypeError(f"remat.every: offset must be an int, got {self.offset!r}")
        if not 0 <= self.offset < self.n:
            raise ValueError(f"remat.every: offset must be in [0, {self.n}), got {self.offset}")

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = []
        for fqn, blocks in block_lists(model):
            prefix = f"{fqn}." if fqn else ""
            for index, (name, block) in enumerate(blocks.named_children()):
                if index % self.n == self.offset:
                    chosen.append((prefix + name, block))
        return chosen


def as_selector(value: Any) -> Selector:
    """A Selector from a selector, a module class, a glob string or a predicate."""
    if isinstance(value, Selector):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return by_type(value)
    if isinstance(value, str):
        return by_name(value)
    if callable(value):
        return where(value)
    raise TypeError(
        "remat: a module filter must be a Selector (by_type, by_name, every, where), a module "
        f"class, a glob pattern or a (module, fqn) -> bool function; got {type(value).__name__}"
    )


def sqrt_segment_length(n: int) -> int:
    """Chen et al.'s segment length for a chain of ``n`` blocks: ceil(sqrt(n))."""
    return max(1, math.ceil(math.sqrt(n)))
