"""Offload saved activations to host memory instead of recomputing them.

``remat.offload()`` is a :class:`~remat.policies.Treatment`: inside each selected region the
tensors autograd saves for backward go to a *store* during forward and come back during
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
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from remat.engine.replay import owner_module
from remat.errors import RematError
from remat.measure.versions import Versioned
from remat.policy.treatments import Treatment

__all__ = ["CpuStore", "CudaPinnedStore", "Offload", "OffloadStats", "OffloadStore", "offload"]


# ---------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class OffloadStats:
    """Bytes and tensors a store moved (all counts since the store was made).

    Attributes:
        bytes_out: device to host (forward).
        bytes_in: host to device (backward, on demand or prefetched).
        tensors_out: storages put into the store.
        tensors_in: storages brought back.
        tensors_prefetched: of ``tensors_in``, those fetched ahead of their use.
        bytes_held: host bytes holding offloaded data now.
        peak_bytes_held: the most ``bytes_held`` has been.
        buffers_allocated: host buffers the pool created; stops growing in steady state.
        bytes_allocated: their bytes (the pool's host footprint).
    """

    bytes_out: int = 0
    bytes_in: int = 0
    tensors_out: int = 0
    tensors_in: int = 0
    tensors_prefetched: int = 0
    bytes_held: int = 0
    peak_bytes_held: int = 0
    buffers_allocated: int = 0
    bytes_allocated: int = 0

    def __add__(self, other: OffloadStats) -> OffloadStats:
        return OffloadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                                for f in fields(self)})  # fmt: skip


@dataclass(slots=True)
class _Handle:
    """One stored tensor: its pooled host buffer and, once fetched, its device copy."""

    buf: Tensor | None  # uint8 host buffer from the pool; None once released
    host: Tensor  # ``buf`` viewed with the tensor's dtype and shape
    device: torch.device
    nbytes: int
    fetched: Any = None  # store-specific: the device copy (and its ready event)


class _HostPool:
    """Host buffers keyed by byte size: a buffer released after backward serves the same
    tensor in the next step, so steady-state training allocates no host memory."""

    def __init__(self, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self.free: dict[int, list[Tensor]] = defaultdict(list)

    def acquire(self, nbytes: int, stats: OffloadStats) -> Tensor:
        if self.free[nbytes]:
            return self.free[nbytes].pop()
        stats.buffers_allocated += 1
        stats.bytes_allocated += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def release(self, buf: Tensor) -> None:
        self.free[buf.numel()].append(buf)


class OffloadStore:
    """Where offloaded tensors live between forward and backward.

    Subclasses implement :meth:`put`, :meth:`get` and :meth:`release`, and may implement
    :meth:`prefetch` and :meth:`accepts`. Calls may come from autograd's worker threads;
    the base class provides ``self._lock``.

    Attributes:
        stats: an :class:`OffloadStats` the store keeps up to date.
    """

    def __init__(self) -> None:
        self.stats = OffloadStats()
        self._lock = threading.RLock()

    def accepts(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` go to this store (others stay where they are)."""
        return device.type != "meta"

    def put(self, tensor: Tensor) -> Any:
        """Copy ``tensor`` into the store; return a handle. The caller drops ``tensor``."""
        raise NotImplementedError

    def get(self, handle: Any) -> Tensor:
        """A tensor equal to the one put (contiguous), on its original device."""
        raise NotImplementedError

    def prefetch(self, handles: Iterable[Any]) -> None:
        """Start bringing ``handles`` back ahead of :meth:`get` (default: nothing)."""

    def release(self, handle: Any) -> None:
        """Give the handle's host memory back; idempotent."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # A copied store (deepcopy/pickle of a model with remat applied) starts empty.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class _PooledStore(OffloadStore):
    """A store of :class:`_Handle` in pooled host buffers; subclasses copy (``put``,
    ``_fetch``, ``get``). Prefetch fetches early; release gives the buffer back."""

    def __init__(self, pin_memory: bool) -> None:
        super().__init__()
        self._pool = _HostPool(pin_memory=pin_memory)

    def _fetch(self, handle: _Handle) -> Any:
        raise NotImplementedError

    def _discard(self, fetched: Any) -> None:
        """Drop a prefetched copy that was never used."""

    def prefetch(self, handles: Iterable[_Handle]) -> None:
        with self._lock:
            for h in handles:
                if h.fetched is None and h.buf is not None:
                    h.fetched = self._fetch(h)
                    self.stats.tensors_prefetched += 1

    def release(self, handle: _Handle) -> None:
        with self._lock:
            if handle.fetched is not None:
                self._discard(handle.fetched)
                handle.fetched = None
            if handle.buf is not None:
                self._pool.release(handle.buf)
                handle.buf = None
                self.stats.bytes_held -= handle.nbytes


class CpuStore(_PooledStore):
    """Synchronous copies into pooled (pageable) host buffers; works for any device.

    On a CPU model the copy replaces the original storage, which autograd no longer holds,
    so it shows offloading's effect in bytes without a GPU. Prefetch copies back early.
    """

    def __init__(self) -> None:
        super().__init__(pin_memory=False)

    def put(self, tensor: Tensor) -> _Handle:
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            buf = self._pool.acquire(nbytes, self.stats)
        host = buf.view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor)
        with self._lock:
            _count_out(self.stats, nbytes)
        return _Handle(buf, host, tensor.device, nbytes)

    def _fetch(self, handle: _Handle) -> Tensor:
        # A real copy even to "cpu": the host buffer goes back to the pool after get.
        out = torch.empty_like(handle.host, device=handle.device).copy_(handle.host)
        self.stats.bytes_in += handle.nbytes
        self.stats.tensors_in += 1
        return out

    def get(self, handle: _Handle) -> Tensor:
        with self._lock:
            if handle.fetched is None:
                return self._fetch(handle)
            out, handle.fetched = handle.fetched, None
            return out


class CudaPinnedStore(_PooledStore):
    """CUDA tensors to pinned host buffers on a side stream, back with prefetch.

    Every copy runs on one side stream per device, and the compute stream waits only on
    events of copies it needs. Reuse of device memory stays stream-ordered, without
    ``record_stream`` (whose deferred frees make memory use depend on CPU timing):

    - forward: the side stream waits for the compute stream (the activation must be
      written) and copies the activation into a pooled pinned buffer; the store keeps the
      activation alive while the last ``stash`` copies are in flight, and before dropping an
      older one makes the compute stream wait on that copy's event, so its block is reused
      only after the copy (a bound on memory when copies are slower than compute);
    - backward: the copy back goes into memory allocated on the compute stream, after the
      side stream has waited for the compute stream's queued work (that memory may have been
      in use); :meth:`get` makes the compute stream wait on the copy's event. Prefetched
      tensors are copied the same way, ahead of their use.

    A pinned buffer is read and written only by the side stream, so giving it back to the
    pool right after its copy back is queued is safe: the next write into it is queued
    behind that read.

    Args:
        stash: copies to the host that may be in flight before the compute stream waits.

    Raises:
        RematError: CUDA is not available.
        ValueError: ``stash`` is not a positive integer.
    """

    def __init__(self, stash: int = 4) -> None:
        if isinstance(stash, bool) or not isinstance(stash, int) or stash < 1:
            raise ValueError(f"CudaPinnedStore: stash must be a positive integer, got {stash!r}")
        if not torch.cuda.is_available():
            raise RematError("CudaPinnedStore: CUDA is not available; use CpuStore() instead")
        super().__init__(pin_memory=True)
        self.stash = stash
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._in_flight: dict[int, deque[tuple[Tensor, torch.cuda.Event]]] = defaultdict(deque)

    def __getstate__(self) -> dict[str, Any]:
        return {"stash": self.stash}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def accepts(self, device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def _index(device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        index = self._index(device)
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def _retire(self, device: torch.device, keep: int) -> None:
        # The compute stream waits for the oldest copies out; then their sources may go.
        compute = torch.cuda.current_stream(device)
        in_flight = self._in_flight[self._index(device)]
        while len(in_flight) > keep:
            _, copied = in_flight.popleft()
            compute.wait_event(copied)

    def put(self, tensor: Tensor) -> _Handle:
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            buf = self._pool.acquire(nbytes, self.stats)
            side = self._side(tensor.device)
            host = buf.view(tensor.dtype).view(tensor.shape)
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            self._in_flight[self._index(tensor.device)].append((tensor, copied))
            self._retire(tensor.device, keep=self.stash)
            _count_out(self.stats, nbytes)
        return _Handle(buf, host, tensor.device, nbytes)

    def _fetch(self, handle: _Handle) -> tuple[Tensor, torch.cuda.Event]:
        side = self._side(handle.device)
        out = torch.empty_like(handle.host, device=handle.device)  # compute stream's memory
        side.wait_stream(torch.cuda.current_stream(handle.device))
        with torch.cuda.stream(side):
            out.copy_(handle.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        self.stats.bytes_in += handle.nbytes
        self.stats.tensors_in += 1
        return out, ready

    def get(self, handle: _Handle) -> Tensor:
        with self._lock:
            self._retire(handle.device, keep=0)  # backward: no copy out is needed any more
            fetched = handle.fetched or self._fetch(handle)
            handle.fetched = None
        out, ready = fetched
        torch.cuda.current_stream(handle.device).wait_event(ready)
        return out

    def _discard(self, fetched: tuple[Tensor, torch.cuda.Event]) -> None:
        # Prefetched, never used: its memory is reused only after its copy ends.
        out, ready = fetched
        torch.cuda.current_stream(out.device).wait_event(ready)


def _count_out(stats: OffloadStats, nbytes: int) -> None:
    stats.bytes_out += nbytes
    stats.tensors_out += 1
    stats.bytes_held += nbytes
    stats.peak_bytes_held = max(stats.peak_bytes_held, stats.bytes_held)


# ---------------------------------------------------------------------------------------
# The registry of one forward pass: regions in the order they ran, and what each saved
# ---------------------------------------------------------------------------------------


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
        self.state_keys = state_keys  # storages of the module's parameters and buffers
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


# ---------------------------------------------------------------------------------------
# The treatment
# ---------------------------------------------------------------------------------------


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
            one region's saved bytes of device memory, held early).
    """

    min_bytes: int = 1 << 20
    store: OffloadStore | None = None
    prefetch: bool = True
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
        if not isinstance(self.prefetch, bool):
            raise TypeError(f"remat.offload: prefetch must be a bool, got {self.prefetch!r}")

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
        with self._state.lock:
            region = _Region(self._state.current_forward(), _state_keys(owner_module(forward)))
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
    min_bytes: int = 1 << 20, *, store: OffloadStore | None = None, prefetch: bool = True
) -> Offload:
    """Offload what each region saves for backward instead of recomputing it.

    Args:
        min_bytes: storages smaller than this stay on the device (default 1 MiB).
        store: an :class:`OffloadStore`; ``None`` uses pinned host buffers for CUDA tensors
            (:class:`CudaPinnedStore`) and leaves tensors on other devices alone.
        prefetch: bring region ``i - 1``'s tensors back while backward runs region ``i``.

    Returns:
        An :class:`Offload` treatment, for ``remat.apply`` alone (the model's repeated
        blocks) or combined with a selector: ``remat.every(2) & remat.offload()``.

    Raises:
        TypeError: ``min_bytes`` is not an int, ``store`` not a store, ``prefetch`` not a bool.
        ValueError: ``min_bytes`` is negative.

    Example:
        >>> policy = remat.offload(min_bytes=0, store=remat.CpuStore())
        >>> remat.apply(model, policy)
        >>> model(x).sum().backward()
        >>> policy.stats.bytes_out
    """
    return Offload(min_bytes=min_bytes, store=store, prefetch=prefetch)
