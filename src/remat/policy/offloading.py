"""Offload saved activations to host memory instead of recomputing them.

``remat.offload()`` is a :class:`~remat.policy.treatments.Treatment`: inside each selected
region the tensors autograd saves for backward go to a *store* during forward and come back during
backward, so nothing is recomputed. The unit of offloading is a storage, not a tensor: views
of one storage (``q``, ``k``, ``v`` split from one ``qkv``) are copied once, and every saved
tensor comes back with its exact dtype, size, strides and offset, so backward runs the same
kernels and gradients are bitwise those of the un-offloaded model. A storage saved twice in
one forward (a ReLU output is also the next Linear's input) is copied once.

Never offloaded: parameters, views of parameters (``weight.t()`` saved by ``addmm``) and the
region module's buffers (they stay on the device anyway, moving them only costs time), and
storages smaller than ``min_bytes``.

Stores:

- :class:`CudaPinnedStore` (the default for CUDA tensors): device-to-host copies into pinned
  buffers from a reusable pool, on a side stream, so copies overlap compute; copies back are
  issued on the side stream too, and when backward first reaches region ``i`` the tensors of
  region ``i - 1`` are prefetched (the scheme of torchtune's ``OffloadActivations``: a side
  stream, events and a small stash of in-flight sources; plus a pinned pool and per-region
  prefetch, which ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` lacks).
- :class:`CpuStore`: synchronous copies into pooled host buffers, for any device. On a CPU
  model it moves nothing in a useful sense (host to host), but it frees the original storages
  exactly as offloading does, so the policy is testable without a GPU.

Not supported: offload regions nested inside checkpointed (recomputed) regions, CUDA graphs.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from remat.engine.region_modules import owner_module
from remat.measure.storage import iter_tensors, storage_of
from remat.measure.versions import Versioned
from remat.policy.offload_stores import CudaPinnedStore, OffloadStats, OffloadStore
from remat.policy.treatments import Treatment

__all__ = ["Offload", "offload"]


class _Forward:
    """Regions of one forward pass, in run order; backward visits them in reverse."""

    def __init__(self) -> None:
        self.regions: list[_Region] = []
        self.backward_started = False
        # (storage key, version) -> (storage, entry), both weak: a storage saved twice in
        # this forward is copied once; a dead storage's key may be reused, hence the check.
        self.seen: dict[tuple[int, int], tuple[weakref.ref, weakref.ref]] = {}


class _Region:
    """One run of a selected module: the entries its saved tensors went to."""

    __slots__ = ("__weakref__", "entered", "entries", "forward", "index", "state_keys")

    def __init__(self, forward: _Forward, state_keys: frozenset[int]) -> None:
        self.forward = forward
        self.index = len(forward.regions)
        self.entries: dict[int, weakref.ref[_Entry]] = {}  # id -> entry, weakly
        self.entered = False  # backward has unpacked from this region
        self.state_keys = state_keys  # storages that stay: the module's state (and inputs)
        forward.regions.append(self)

    def pending(self) -> list[Any]:
        """Handles of live entries not brought back yet."""
        return [e.handle for ref in self.entries.values() if (e := ref()) and e.handle is not None]


class _Entry:
    """One offloaded storage; lives while autograd holds a tensor packed from it."""

    __slots__ = ("__weakref__", "handle", "nbytes", "restored", "store")

    def __init__(self, store: OffloadStore, handle: Any, nbytes: int) -> None:
        self.store = store
        self.handle = handle  # None once brought back
        self.nbytes = nbytes
        self.restored: Tensor | None = None  # the storage back on its device, as uint8
        weakref.finalize(self, store.release, handle)  # graph freed without a backward


@dataclass(frozen=True, slots=True)
class _Packed:
    """What autograd keeps for one saved tensor: its entry and its view geometry."""

    entry: _Entry
    region: _Region
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


class _State:
    """Mutable runtime state of an :class:`Offload` (the treatment itself is frozen)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.forward: weakref.ref[_Forward] | None = None
        self.default_store: OffloadStore | None = None
        self.warned = False

    def current_forward(self) -> _Forward:
        fwd = self.forward() if self.forward is not None else None
        if fwd is None or fwd.backward_started:
            fwd = _Forward()
            self.forward = weakref.ref(fwd)
        return fwd

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copied treatment starts with no forward and no stores

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def _offloadable(t: Tensor) -> bool:
    # Plain strided tensors only: subclasses (DTensor, FakeTensor) and conj/neg views carry
    # more than storage + geometry, which is all that is restored.
    return (
        type(t) in (Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.device.type != "meta"
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
    )


def _state_keys(module: Any) -> frozenset[int]:
    if not isinstance(module, nn.Module):
        return frozenset()
    return frozenset(t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True, kw_only=True)
class Offload(Treatment):
    """Saved tensors of each region go to a store in forward and come back in backward.

    Attributes:
        min_bytes: storages smaller than this stay where they are: small copies cost more
            in latency than they save in memory.
        store: where tensors go. ``None``: a :class:`CudaPinnedStore` for CUDA tensors
            (made on first use), and tensors on other devices stay; pass ``CpuStore()`` to
            offload from any device with plain synchronous copies.
        prefetch: when backward first unpacks from a region, start bringing back the
            previous region's tensors, so the copy overlaps this region's backward (costs
            one region's saved bytes of device memory, held early). ``"own"``: bring back
            all of this region's tensors then, the first needed first, so the copies
            overlap the region's own backward and nothing is held early (what the planner
            models). ``False``: each tensor when backward needs it.
        keep_inputs: the storages of the region's tensor inputs stay on the device, as a
            checkpoint keeps them: the caller or the region before often holds them anyway,
            and moving one would bring a second copy back in backward (the planner's
            offload action keeps them).
    """

    min_bytes: int = 1 << 20
    store: OffloadStore | None = None
    prefetch: bool | str = True
    keep_inputs: bool = False
    name: str = "offload"
    _state: _State = field(default_factory=_State, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int):
            raise TypeError(f"remat.offload: min_bytes must be an int, got {self.min_bytes!r}")
        if self.min_bytes < 0:
            raise ValueError(f"remat.offload: min_bytes must be >= 0, got {self.min_bytes}")
        if self.store is not None and not isinstance(self.store, OffloadStore):
            raise TypeError(
                "remat.offload: store must be an OffloadStore (CpuStore(), CudaPinnedStore()) "
                f"or None, got {type(self.store).__name__}"
            )
        if not isinstance(self.prefetch, bool) and self.prefetch != "own":
            raise TypeError(
                f"remat.offload: prefetch must be True, False or 'own', got {self.prefetch!r}"
            )
        if not isinstance(self.keep_inputs, bool):
            raise TypeError(f"remat.offload: keep_inputs must be a bool, got {self.keep_inputs!r}")

    @property
    def stats(self) -> OffloadStats:
        """A snapshot of the store's :class:`OffloadStats` (zeros before any offload)."""
        store = self.store or self._state.default_store
        return OffloadStats() if store is None else replace(store.stats)

    def check(self, model: nn.Module, regions: list[tuple[str, nn.Module]]) -> None:
        """Warn once when no region's parameters live on a device the store takes."""
        tensors = [t for _, m in regions for t in (*m.parameters(), *m.buffers())]
        devices = {t.device for t in tensors or [*model.parameters(), *model.buffers()]}
        if not devices or self._state.warned:
            return
        if self.store is not None:
            accepted = any(self.store.accepts(d) for d in devices)
        else:
            accepted = any(d.type == "cuda" for d in devices)
        if not accepted:
            self._state.warned = True
            where = ", ".join(sorted({d.type for d in devices}))
            warnings.warn(
                f"remat.offload: the model's parameters are on {where}; offloading a CPU model "
                "to CPU has no effect, saved tensors stay where they are. Move the model to "
                "CUDA, or pass store=remat.CpuStore() to copy them anyway.",
                UserWarning,
                stacklevel=3,
            )

    def _store_for(self, device: torch.device) -> OffloadStore | None:
        if self.store is not None:
            return self.store if self.store.accepts(device) else None
        if device.type != "cuda":
            return None
        with self._state.lock:
            if self._state.default_store is None:
                self._state.default_store = CudaPinnedStore()
            return self._state.default_store

    def run(self, forward, args, kwargs):
        # Nothing is saved without grad; in backward (a recomputation) leave things as they are.
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return forward(*args, **kwargs)
        stay = _state_keys(owner_module(forward))
        if self.keep_inputs:
            stay |= {st._cdata for t in iter_tensors(args, kwargs) if (st := storage_of(t))}
        with self._state.lock:
            region = _Region(self._state.current_forward(), stay)
        pack = functools.partial(self._pack, region)
        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            return forward(*args, **kwargs)

    def _pack(self, region: _Region, t: Tensor) -> Any:
        # A tensor that stays is checked on unpack as autograd would without this hook; an
        # offloaded one comes back as the forward saw it.
        if not _offloadable(t) or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return Versioned(t)
        st = t.untyped_storage()
        nbytes = st.nbytes()
        if nbytes < self.min_bytes or st._cdata in region.state_keys:
            return Versioned(t)
        store = self._store_for(t.device)
        if store is None:
            return Versioned(t)
        fwd = region.forward
        key = (st._cdata, t._version)
        with self._state.lock:
            seen = fwd.seen.get(key)
            entry = seen[1]() if seen is not None and seen[0]() is st else None
            if entry is None:
                whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)  # (nbytes,)
                entry = _Entry(store, store.put(whole), nbytes)
                fwd.seen[key] = (weakref.ref(st), weakref.ref(entry))
            region.entries[id(entry)] = weakref.ref(entry)
        return _Packed(entry, region, t.dtype, t.storage_offset(), t.size(), t.stride())

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Versioned):
            return packed.unpack("an offloaded region")
        entry, region = packed.entry, packed.region
        with self._state.lock:
            region.forward.backward_started = True
            if entry.restored is None:
                entry.restored = entry.store.get(entry.handle)
                entry.store.release(entry.handle)
                entry.handle = None
            if self.prefetch and not region.entered:
                region.entered = True
                if self.prefetch == "own":  # backward needs them in reverse order
                    entry.store.prefetch(reversed(region.pending()))
                else:
                    self._prefetch_before(region, entry.store)
            data = entry.restored
        out = torch.empty(0, dtype=packed.dtype, device=data.device)
        return out.set_(data.untyped_storage(), packed.offset, packed.size, packed.stride)

    @staticmethod
    def _prefetch_before(region: _Region, store: OffloadStore) -> None:
        # Backward reached ``region``: bring back the nearest earlier region that still has
        # tensors in the store, while this one's backward computes.
        for earlier in reversed(region.forward.regions[: region.index]):
            handles = earlier.pending()
            if handles:
                store.prefetch(handles)
                return


def offload(
    min_bytes: int = 1 << 20, *, store: OffloadStore | None = None, prefetch: bool | str = True
) -> Offload:
    """Offload what each region saves for backward instead of recomputing it.

    Args:
        min_bytes: storages smaller than this stay on the device (default 1 MiB).
        store: an :class:`OffloadStore`; ``None`` uses pinned host buffers for CUDA tensors
            (:class:`CudaPinnedStore`) and leaves tensors on other devices alone.
        prefetch: bring region ``i - 1``'s tensors back while backward runs region ``i``;
            ``"own"``: region ``i``'s own, all at once, when its backward starts; ``False``:
            none ahead of use.

    Returns:
        An :class:`Offload` treatment, for ``remat.apply`` alone (the model's repeated
        blocks) or combined with a selector: ``remat.every(2) & remat.offload()``.

    Raises:
        TypeError: ``min_bytes`` is not an int, ``store`` not a store, ``prefetch`` not a
            bool or ``"own"``.
        ValueError: ``min_bytes`` is negative.

    Example:
        >>> policy = remat.offload(min_bytes=0, store=remat.CpuStore())
        >>> remat.apply(model, policy)
        >>> model(x).sum().backward()
        >>> policy.stats.bytes_out
    """
    return Offload(min_bytes=min_bytes, store=store, prefetch=prefetch)
