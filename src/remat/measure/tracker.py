"""Byte-exact memory accounting on any device: ``MemoryTracker`` and ``saved_activations``.

``torch.cuda.max_memory_allocated`` needs a GPU and counts the allocator's rounding and cached
blocks. The tracker instead counts tensor *storages*: a ``TorchDispatchMode`` sees every op's
outputs and records each new storage once (views, in-place and ``out=`` results share a storage
of one of the op's inputs, so they are not new), and a ``weakref.finalize`` on the storage
subtracts its bytes when it is freed. Because only storage sizes are read, the same figures come
out on ``cpu``, ``cuda`` and ``meta``.

``torch.autograd.graph.saved_tensors_hooks`` tell which storages autograd keeps for backward.
Checkpointing pushes its own hooks inside ours, so inside a checkpointed region we see only
what the checkpoint itself saves (its inputs), which is exactly what it holds.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from remat.errors import RematError
from remat.measure.storage import iter_tensors, storage_of, tensors_of
from remat.measure.versions import Versioned, checked_version

__all__ = ["MemoryTracker", "PeakWindow", "TimelineEvent", "host_memory"]


OUTSIDE = "<outside>"  # allocated while no module of the tracked model ran (e.g. the loss)


BACKWARD = "<backward>"  # allocated by the autograd engine outside any (recomputed) module


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One op seen by the tracker.

    Attributes:
        op: the aten op, e.g. ``"aten.addmm.default"``.
        module: qualified name of the innermost module running (``""`` is the root).
        phase: ``"forward"`` or ``"backward"`` (the autograd engine is running).
        live_bytes: bytes of live storages right after the op.
    """

    op: str
    module: str
    phase: str
    live_bytes: int


_host = threading.local()


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Storages made inside are host memory apart from the device's (an offload store's
    buffers): trackers count them in ``host_bytes``, not in ``peak_bytes``. On a CPU model
    they are the same physical memory; the split shows what offloading would free."""
    before = getattr(_host, "on", False)
    _host.on = True
    try:
        yield
    finally:
        _host.on = before


def _phase() -> str:
    # -1 outside the autograd engine; a graph task id while backward runs (also in its threads).
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


class _Held:
    """What our pack hook hands autograd: a detached alias, so the graph holds the storage
    without a reference cycle through ``grad_fn``; its finalizer says when autograd lets go.
    A pack hook turns off autograd's version check, so the version is checked on unpack."""

    __slots__ = ("__weakref__", "t", "version")

    def __init__(self, t: Tensor, version: int) -> None:
        self.t = t
        self.version = version


class PeakWindow:
    """The highest live total a tracker saw since the window opened
    (``MemoryTracker.open_window``) or, after an op, since it was last read (``take``):
    several can be open beside ``window_peak_bytes``, e.g. to cut a phase where some
    storages are freed. ``None``: no op ran since it was last read."""

    __slots__ = ("peak",)

    def __init__(self, peak: int | None) -> None:
        self.peak = peak

    def take(self) -> int | None:
        """The peak so far; the window starts over from the next op."""
        peak, self.peak = self.peak, None
        return peak


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracker._after_op(func, args, kwargs, out)
        return out


class MemoryTracker:
    """Counts live and peak bytes of tensor storages, exactly, on cpu, cuda and meta.

    Args:
        module: the model whose qualified module names attribute the bytes; its forward
            pre/post hooks mark which module runs. ``None``: everything is ``"<outside>"``.
        count_existing: tensors and modules (parameters, buffers, inputs) whose storages count
            as live from the start, so totals match what the device holds.
        timeline: record a :class:`TimelineEvent` per op (turn off for very long runs).

    Attributes (bytes):
        peak_bytes: highest live total seen.
        window_peak_bytes: highest live total since the last :meth:`start_window` (or since
            the start).
        current_bytes: live total now (at exit: what stays allocated).
        peak_by_phase: ``{"forward": ..., "backward": ...}``.
        peak_by_module: for each module, the highest live total while it ran (it or a
            submodule); backward ops outside recomputed modules count under ``"<backward>"``.
        saved_bytes: activations autograd holds for backward at the end of forward (unique
            storages; parameters and buffers are not activations and are left out).
        saved_bytes_by_module: the same per module, counting what the module or its submodules
            saved. A storage saved by two modules (a ReLU output is also the next Linear's
            input) counts in both rows but once in ``saved_bytes``.
        timeline: list of :class:`TimelineEvent`.
        cuda_max_allocated, cuda_max_reserved: the CUDA allocator's own peaks (its peak stats
            are reset on entry); ``None`` when nothing tracked lives on CUDA.
        host_bytes, host_peak_bytes: live and peak bytes of storages made inside
            :func:`host_memory` (offload stores' host buffers), which the other figures
            leave out.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``count_existing`` holds other things.

    Example:
        >>> with MemoryTracker(module=model, count_existing=[model, x]) as mt:
        ...     model(x).sum().backward()
        >>> mt.peak_by_phase["forward"], mt.saved_bytes
    """

    def __init__(
        self,
        *,
        module: nn.Module | None = None,
        count_existing: Iterable[Tensor | nn.Module] = (),
        timeline: bool = True,
    ) -> None:
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"MemoryTracker: module must be an nn.Module, got {type(module)!r}")
        items = (
            [count_existing]
            if isinstance(count_existing, (Tensor, nn.Module))
            else list(count_existing)
        )
        self.module = module
        self._existing = tensors_of(items)
        # Parameters and buffers are held anyway; saved_bytes counts activations only.
        self._state = [
            t
            for m in [module, *items]
            if isinstance(m, nn.Module)
            for t in (*m.parameters(), *m.buffers())
        ]
        self._record_timeline = timeline
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.peak_bytes = 0
        self.window_peak_bytes = 0
        self.current_bytes = 0
        self.peak_by_phase: dict[str, int] = {"forward": 0, "backward": 0}
        self.peak_by_module: dict[str, int] = {}
        self.saved_bytes = 0
        self.saved_bytes_by_module: dict[str, int] = {}
        self.timeline: list[TimelineEvent] = []
        self.cuda_max_allocated: int | None = None
        self.cuda_max_reserved: int | None = None
        self.host_bytes = 0
        self.host_peak_bytes = 0
        self._live: dict[int, int] = {}  # storage key -> bytes
        self.allocations = 0  # storages made so far (device and host)
        self._born: dict[int, int] = {}  # storage key -> allocations when it was made
        self._host_live: dict[int, int] = {}  # the same, host buffers (host_memory)
        self._finalizers: list[weakref.finalize] = []
        self._held: dict[int, list] = {}  # storage key -> [holders, bytes, modules]
        self._not_activations: set[int] = set()  # parameter and buffer storages
        self._stack: list[str] = []
        self._windows: list[PeakWindow] = []
        self._last_phase = "forward"
        self._snapshot_taken = False
        self._active = False
        self._internal = False
        self._cuda_device: torch.device | None = None

    # ---- context manager -------------------------------------------------------------
    def __enter__(self) -> MemoryTracker:
        if self._active:
            # A second enter would replace the first's exit stack, and the first exit would
            # then leave this tracker's dispatch mode and hooks on for good.
            raise RematError(
                "MemoryTracker: this tracker is already active; it cannot be entered again "
                "inside itself (use a second MemoryTracker)"
            )
        self._reset()
        self._active = True
        for t in [*self._state, *(t for t in self._existing if isinstance(t, nn.Parameter))]:
            st = storage_of(t)
            if st is not None:
                self._not_activations.add(st._cdata)
        for t in self._existing:
            st = storage_of(t)
            if st is not None and st._cdata not in self._live:  # tied weights count once
                self._add_storage(st)
        self._update_peaks(self._phase_now())
        self._start_cuda([*self._state, *self._existing])
        self._stack_ctx = contextlib.ExitStack()
        try:
            if self.module is not None:
                self._install_module_hooks(self.module)
            self._stack_ctx.enter_context(
                torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            )
            self._stack_ctx.enter_context(_Mode(self))
        except BaseException:
            self._stack_ctx.close()
            self._active = False
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack_ctx.close()  # pops the mode, the hooks and the module hooks, in order
        finally:
            with self._lock:
                if not self._snapshot_taken:
                    self._snapshot_saved()
                self._active = False
                for f in self._finalizers:
                    f.detach()
                self._finalizers.clear()
                self._stack.clear()
            self._stop_cuda()

    # ---- module attribution ----------------------------------------------------------
    def _install_module_hooks(self, root: nn.Module) -> None:
        def pre(name: str):
            def hook(mod, args):
                self._stack.append(name)
                with self._lock:  # a module that runs no op still has a peak: what is live
                    if self.current_bytes > self.peak_by_module.get(name, -1):
                        self.peak_by_module[name] = self.current_bytes

            return hook

        def post(name: str):
            def hook(mod, args, out):
                # Pop our own name; an exception may have skipped inner pops.
                while self._stack and self._stack.pop() != name:
                    pass

            return hook

        for name, mod in root.named_modules():
            self._stack_ctx.callback(mod.register_forward_pre_hook(pre(name)).remove)
            self._stack_ctx.callback(mod.register_forward_hook(post(name), always_call=True).remove)

    def _current_module(self, phase: str) -> str:
        if self._stack:
            return self._stack[-1]
        return BACKWARD if phase == "backward" else OUTSIDE

    def _phase_now(self) -> str:
        phase = _phase()
        if phase != self._last_phase:
            if phase == "backward" and not self._snapshot_taken:
                self._snapshot_saved()
            self._last_phase = phase
        return phase

    # ---- storage accounting ----------------------------------------------------------
    def _add_storage(self, st: torch.UntypedStorage, host: bool = False) -> None:
        key, nbytes = st._cdata, st.nbytes()
        self.allocations += 1
        self._born[key] = self.allocations
        if host:  # made inside host_memory(): counted apart from the device's bytes
            self._host_live[key] = nbytes
            self.host_bytes += nbytes
            self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
        else:
            self._live[key] = nbytes
            self.current_bytes += nbytes
        self._finalizers.append(weakref.finalize(st, self._on_free, key))

    def _on_free(self, key: int) -> None:
        with self._lock:
            self._born.pop(key, None)  # kept for live storages only, as ``_live`` is
            if self._active and key in self._live:
                self.current_bytes -= self._live.pop(key)
            elif self._active and key in self._host_live:
                self.host_bytes -= self._host_live.pop(key)

    def live_bytes_of(self, values: Any) -> int:
        """Bytes of the distinct storages behind the tensors in ``values`` that the tracker
        counts as live (made while it tracks, not freed)."""
        keys = {st._cdata for t in iter_tensors(values) if (st := storage_of(t)) is not None}
        with self._lock:
            return sum(self._live.get(k, 0) for k in keys)

    def made_after(self, t: Tensor, allocations: int) -> bool:
        """Whether the tracker made ``t``'s storage once it had made ``allocations``
        storages (``allocations`` read then): a storage made before it started is not."""
        st = storage_of(t)
        with self._lock:
            return st is not None and self._born.get(st._cdata, 0) > allocations

    def live_bytes_made_by(self, allocations: int, exclude: Iterable[int] = ()) -> int:
        """Bytes of the live storages the tracker had made by the time it had made
        ``allocations`` (``allocations`` read then), those keyed in ``exclude`` aside."""
        return self.live_bytes_born(lambda born: born <= allocations, exclude)

    def live_bytes_made_after(self, allocations: int) -> int:
        """Bytes of the live storages the tracker made once it had made ``allocations``
        (``allocations`` read then): what a phase made and still holds."""
        return self.live_bytes_born(lambda born: born > allocations)

    def live_bytes_born(
        self,
        when: Callable[[int], bool],
        exclude: Iterable[int] = (),
        include: Iterable[int] = (),
    ) -> int:
        """Bytes of the live storages whose birth (how many storages the tracker had made
        with it; 0: made before it started) ``when`` accepts, or keyed in ``include``;
        those keyed in ``exclude`` aside."""
        skip, add = set(exclude), set(include)
        with self._lock:
            return sum(
                n
                for key, n in self._live.items()
                if key not in skip and (key in add or when(self._born.get(key, 0)))
            )

    def start_window(self) -> None:
        """Start ``window_peak_bytes`` over: from now on, the highest live total since this
        call (e.g. between one module's forward and its backward)."""
        with self._lock:
            self.window_peak_bytes = self.current_bytes

    def open_window(self) -> PeakWindow:
        """A window of its own on the live total, from now (``PeakWindow``), until
        :meth:`close_window`."""
        with self._lock:
            window = PeakWindow(self.current_bytes)
            self._windows.append(window)
            return window

    def close_window(self, window: PeakWindow) -> int | None:
        """Stop following ``window``; its peak since it was last read."""
        with self._lock:
            if window in self._windows:
                self._windows.remove(window)
            return window.take()

    def _update_peaks(self, phase: str) -> None:
        cur = self.current_bytes
        self.window_peak_bytes = max(self.window_peak_bytes, cur)
        for window in self._windows:
            if window.peak is None or cur > window.peak:
                window.peak = cur
        self.peak_bytes = max(self.peak_bytes, cur)
        self.peak_by_phase[phase] = max(self.peak_by_phase[phase], cur)
        names = self._stack or [self._current_module(phase)]
        for name in set(names):
            if cur > self.peak_by_module.get(name, -1):
                self.peak_by_module[name] = cur

    def _after_op(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if self._internal or not self._active:
            return
        with self._lock:
            phase = self._phase_now()
            inputs = {st._cdata for t in iter_tensors(args, kwargs) if (st := storage_of(t))}
            for t in iter_tensors(out):
                st = storage_of(t)
                if st is None:
                    continue
                key = st._cdata
                if key in self._host_live:
                    continue
                if key in self._live:
                    grown = st.nbytes() - self._live[key]  # resize_ or out= resizing
                    self._live[key] += grown
                    self.current_bytes += grown
                elif key not in inputs:
                    self._add_storage(st, host=getattr(_host, "on", False))
            self._update_peaks(phase)
            if self._record_timeline:
                self.timeline.append(
                    TimelineEvent(str(func), self._current_module(phase), phase, self.current_bytes)
                )

    # ---- saved tensors ---------------------------------------------------------------
    def _pack(self, t: Tensor) -> Any:
        st = storage_of(t)
        if (
            st is None
            or st._cdata in self._not_activations
            or isinstance(t, nn.Parameter)
            or isinstance(t._base, nn.Parameter)  # weight.t() saved by addmm
        ):
            return Versioned(t)
        key = st._cdata
        self._internal = True  # our own detach() is not part of the model's timeline
        try:
            holder = _Held(t.detach(), t._version)
        finally:
            self._internal = False
        with self._lock:
            entry = self._held.setdefault(key, [0, st.nbytes(), set()])
            entry[0] += 1
            entry[2].update(self._stack or [self._current_module(_phase())])
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, _Held):
            return checked_version(packed.t, packed.version, "the tracked model")
        return packed.unpack("the tracked model")

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._held.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del self._held[key]

    def _snapshot_saved(self) -> None:
        self._snapshot_taken = True
        by_module: dict[str, int] = {}
        total = 0
        for _, nbytes, modules in self._held.values():
            total += nbytes
            for name in modules:
                by_module[name] = by_module.get(name, 0) + nbytes
        self.saved_bytes = total
        self.saved_bytes_by_module = by_module

    # ---- CUDA allocator figures --------------------------------------------------------
    def _start_cuda(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            if t.device.type == "cuda":
                self._cuda_device = t.device
                torch.cuda.synchronize(t.device)
                torch.cuda.reset_peak_memory_stats(t.device)
                return

    def _stop_cuda(self) -> None:
        if self._cuda_device is not None:
            torch.cuda.synchronize(self._cuda_device)
            self.cuda_max_allocated = torch.cuda.max_memory_allocated(self._cuda_device)
            self.cuda_max_reserved = torch.cuda.max_memory_reserved(self._cuda_device)

    def summary(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (bytes; the timeline only as its length)."""
        return {
            "peak_bytes": self.peak_bytes,
            "current_bytes": self.current_bytes,
            "peak_by_phase": dict(self.peak_by_phase),
            "peak_by_module": dict(self.peak_by_module),
            "saved_bytes": self.saved_bytes,
            "saved_bytes_by_module": dict(self.saved_bytes_by_module),
            "cuda_max_allocated": self.cuda_max_allocated,
            "cuda_max_reserved": self.cuda_max_reserved,
            "host_peak_bytes": self.host_peak_bytes,
            "timeline_events": len(self.timeline),
        }
