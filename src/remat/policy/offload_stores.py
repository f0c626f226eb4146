"""Where offloaded tensors live between forward and backward: ``CpuStore`` (synchronous
copies into pooled host buffers, any device) and ``CudaPinnedStore`` (pinned buffers, a side
stream, prefetch). A store implements ``put``, ``get``, ``release`` and may ``prefetch``.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from remat.errors import RematError
from remat.measure.tracker import host_memory

__all__ = ["CpuStore", "CudaPinnedStore", "OffloadStats", "OffloadStore"]


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
        with host_memory():  # a tracker counts it apart from the device's memory
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
