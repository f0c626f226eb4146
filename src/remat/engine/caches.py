"""KV caches (transformers' ``Cache`` and the like): Python objects a region appends to,
which its recomputation gets as they were before the forward.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from torch import Tensor, nn

from remat.errors import CheckpointError

__all__ = ["CacheSnapshot", "fresh_caches", "snapshot_caches"]


def _cache_classes() -> tuple[type, ...]:
    # Never import transformers for this: a model that passes a cache has imported it.
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is None:
        return ()
    names = ("Cache", "CacheLayerMixin", "LinearAttentionCacheLayerMixin")
    return tuple(c for c in (getattr(cache_utils, n, None) for n in names) if c is not None)


def _is_cache_part(obj: Any, classes: tuple[type, ...]) -> bool:
    if isinstance(obj, (Tensor, nn.Module, type)):
        return False
    # Models define caches of their own too (MimiConv1dPaddingCache, ReformerDynamicCache).
    name = type(obj).__name__
    return isinstance(obj, classes) or name.endswith(("Cache", "CacheLayer"))


def _structure_copy(obj: Any, classes: tuple[type, ...], memo: dict[int, Any]) -> Any:
    """``obj`` with its cache objects, lists, tuples and dicts copied and everything else
    (tensors, configs) shared."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, (list, tuple, dict)) or _is_cache_part(obj, classes):
        if isinstance(obj, list):
            new: Any = memo.setdefault(id(obj), [])
            new.extend(_structure_copy(v, classes, memo) for v in obj)
        elif isinstance(obj, tuple):
            new = memo.setdefault(id(obj), tuple(_structure_copy(v, classes, memo) for v in obj))
        elif isinstance(obj, dict):
            new = memo.setdefault(id(obj), copy.copy(obj))
            for k, v in obj.items():
                new[k] = _structure_copy(v, classes, memo)
        else:
            new = memo.setdefault(id(obj), copy.copy(obj))
            for k, v in getattr(obj, "__dict__", {}).items():
                new.__dict__[k] = _structure_copy(v, classes, memo)
        return new
    return obj


class CacheSnapshot:
    """A KV cache (transformers' ``Cache`` and the like) as it was before a region's forward.

    The forward appends this step's keys and values to the cache, so recomputing from the
    cache itself would append them a second time, and attention would read twice as many
    positions. Recomputation instead gets a copy of the cache's structure as it was (the
    tensors it held then are shared, not copied), which it may append to: the forward's
    cache ends exactly as without checkpointing, and the recomputation sees what the
    forward saw.
    """

    def __init__(self, cache: Any) -> None:
        self.classes = _cache_classes()
        self.copy = _structure_copy(cache, self.classes, {})
        self.kind = type(cache).__name__
        # Tensors shared with the cache: a write into one (a static cache's buffers) would
        # show in the recomputation.
        shared: dict[int, Tensor] = {}
        _find_tensors(self.copy, shared, set())
        self.versions = [(t, t._version) for t in shared.values()]

    def fresh(self, region: str) -> Any:
        """A copy of the cache as it was before the forward, for one recomputation."""
        for tensor, version in self.versions:
            if tensor._version != version:
                raise CheckpointError(
                    f"remat.checkpoint: {region} writes in place into a tensor its {self.kind} "
                    "held before the forward (a static or recurrent-state cache), so its "
                    "recomputation cannot see the cache as the forward did. Train with "
                    "use_cache=False (transformers turns it off under gradient checkpointing)."
                )
        return _structure_copy(self.copy, self.classes, {})


def _find_tensors(obj: Any, found: dict[int, Tensor], seen: set[int]) -> None:
    if isinstance(obj, Tensor):
        found[id(obj)] = obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        values: Any = obj
    elif isinstance(obj, dict):
        values = obj.values()
    else:
        values = getattr(obj, "__dict__", {}).values()
    for value in values:
        _find_tensors(value, found, seen)


def snapshot_caches(leaves: list[Any]) -> list[Any]:
    """``leaves`` with every KV cache among them replaced by its :class:`CacheSnapshot`."""
    classes = _cache_classes()
    return [CacheSnapshot(x) if _is_top_cache(x, classes) else x for x in leaves]


def _is_top_cache(obj: Any, classes: tuple[type, ...]) -> bool:
    return _is_cache_part(obj, classes) and not type(obj).__name__.endswith("CacheLayer")


def fresh_caches(leaves: list[Any], region: str) -> list[Any]:
    """``leaves`` with every :class:`CacheSnapshot` replaced by a fresh copy of its cache."""
    return [x.fresh(region) if isinstance(x, CacheSnapshot) else x for x in leaves]
