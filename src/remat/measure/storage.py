"""Private helpers for counting tensor storages: keys, sizes, and walking nested values.

A storage, not a tensor, is what holds memory: views, ``detach()`` and in-place results share
their base's storage. Everything here identifies a storage by the address of its C++
``StorageImpl`` (``UntypedStorage._cdata``), which is unique while the storage lives and, unlike
``data_ptr()``, is also distinct for meta and zero-byte storages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["device_of", "iter_tensors", "storage_of", "tensors_of", "unique_storage_bytes"]


def storage_of(t: Tensor) -> torch.UntypedStorage | None:
    """The untyped storage behind ``t``, or ``None`` for tensors without one (sparse, nested).

    A wrapper subclass (a ``DTensor``) holds its memory in the tensors it wraps: its own
    ``untyped_storage()`` is an empty shell of the *global* shape's size, so the storage of
    its largest inner tensor (a DTensor's local shard) stands for it.
    """
    if is_traceable_wrapper_subclass(t):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        stores = [s for s in map(storage_of, (i for i in inner if isinstance(i, Tensor))) if s]
        return max(stores, key=lambda s: s.nbytes(), default=None)
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def iter_tensors(*values: Any) -> Iterator[Tensor]:
    """Every tensor found in (possibly nested) lists, tuples, dicts and pytree nodes."""
    for leaf in tree_leaves(values):
        if isinstance(leaf, Tensor):
            yield leaf


def tensors_of(items: Iterable[Any]) -> list[Tensor]:
    """Tensors named by ``items``: tensors themselves, and every parameter and buffer of a module.

    Raises:
        TypeError: an item is neither a tensor, a module nor a container of them.
    """
    out: list[Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            out.extend(item.parameters())
            out.extend(item.buffers())
        elif isinstance(item, Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple, dict)):
            out.extend(iter_tensors(item))
        else:
            raise TypeError(
                f"count_existing[{i}]: expected a Tensor or nn.Module, got {type(item).__name__}"
            )
    return out


def unique_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = storage_of(t)
        if st is not None:
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def device_of(inputs: Iterable[Any], *, what: str = "inputs") -> torch.device | None:
    """The one device all tensors in ``inputs`` live on (``None`` when there are none).

    Raises:
        ValueError: the tensors are on different devices; the message names two of them.
    """
    first: tuple[str, torch.device] | None = None
    for i, value in enumerate(inputs):
        for t in iter_tensors(value):
            if first is None:
                first = (f"{what}[{i}]", t.device)
            elif t.device != first[1]:
                raise ValueError(
                    f"{what} are on different devices: {first[0]} is on {first[1]}, "
                    f"{what}[{i}] is on {t.device}"
                )
    return None if first is None else first[1]
