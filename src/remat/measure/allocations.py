"""Peaks that see inside compiled code: ``AllocationTracker`` replays the allocator's events.

:class:`~remat.MemoryTracker` counts the storages a dispatch mode sees. Code that
``torch.compile`` generates allocates its buffers without dispatching (Inductor calls
``empty_strided`` from its own wrapper), and dynamo runs a function eagerly when a dispatch
mode is on, so a compiled step is invisible to it. The allocators themselves (the CPU
allocator and CUDA's caching allocator) report every allocation and free, with its address
and size, to the profiler when ``profile_memory=True``. This tracker replays those events in
time order: a block allocated inside the window adds its bytes, its free subtracts them, and
the free of a block allocated before the window is not counted, so that, like
``MemoryTracker`` without ``count_existing``, it counts the step's new bytes.

On CUDA the events carry the caching allocator's rounded block sizes; the allocator's own
``max_memory_allocated``/``max_memory_reserved`` (reset on entry, above what was allocated
then) are reported beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from remat.errors import RematError

__all__ = ["AllocationTracker", "allocated_step_peak"]


class AllocationTracker:
    """The peak of new bytes in a window, from the allocators' own events: it sees what
    ``torch.compile``'s generated code allocates, on CPU and CUDA.

    Args:
        device: count only allocations on this device (``"cpu"``, ``"cuda"``,
            ``"cuda:1"``; a bare ``"cuda"`` means every CUDA device). ``None``: every
            device, summed, as :class:`~remat.MemoryTracker` sums storages.

    Attributes (bytes, filled in on exit):
        peak_bytes: the highest total of blocks allocated in the window and not yet freed.
        current_bytes: what the window allocated and still holds at its end.
        peak_by_device: the same peak per device (``{"cpu": ..., "cuda:0": ...}``), each
            device's own highest point.
        allocations: blocks allocated in the window (counted devices).
        cuda_max_allocated, cuda_max_reserved: the CUDA caching allocator's peaks in the
            window above what it held on entry; ``None`` without CUDA.

    Raises:
        RematError: entered inside itself, or the profiler is already running (it cannot
            be nested).

    Example:
        >>> compiled = torch.compile(model)
        >>> with AllocationTracker() as at:
        ...     loss_fn(compiled(x)).backward()
        >>> at.peak_bytes
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"AllocationTracker: device must be a str or torch.device, got {type(device)!r}"
            )
        self.device = None if device is None else str(torch.device(device))
        self.peak_bytes = 0
        self.current_bytes = 0
        self.peak_by_device: dict[str, int] = {}
        self.allocations = 0
        self.cuda_max_allocated: int | None = None
        self.cuda_max_reserved: int | None = None
        self._profiler: Any = None
        self._cuda_before: dict[int, int] = {}

    def __enter__(self) -> AllocationTracker:
        from torch.profiler import ProfilerActivity, profile

        if self._profiler is not None:
            raise RematError("AllocationTracker: this tracker is already active")
        if torch._C._autograd._profiler_enabled():
            raise RematError(
                "AllocationTracker: the PyTorch profiler is already running; it reads the "
                "allocators' events through the profiler, which does not nest"
            )
        self._start_cuda()
        activities = [ProfilerActivity.CPU]
        # Memory events of every device come through the CPU activity; CUDA kernels are
        # not needed (and would need CUPTI).
        self._profiler = profile(activities=activities, profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(*exc)
        self._stop_cuda()
        # By time, then by the order each thread recorded them (a free and the allocation
        # that reuses its address can share a timestamp).
        events = sorted(_allocation_events(profiler), key=lambda e: (e[0], e[4]))
        self._replay([e[:4] for e in events if self._counts(e[3])])

    def _counts(self, device: str) -> bool:
        if self.device is None or device == self.device:
            return True
        return self.device == "cuda" and device.startswith("cuda")

    def _replay(self, events: list[tuple[int, int, int, str]]) -> None:
        live: dict[int, int] = {}  # address -> bytes of a block allocated in the window
        total, peak = 0, 0
        by_device: dict[str, int] = {}
        peak_by_device: dict[str, int] = {}
        for _, size, address, device in events:
            if size > 0:
                live[address] = size
                self.allocations += 1
            elif address in live:  # a free of a block made before the window is not ours
                size = -live.pop(address)
            else:
                continue
            total += size
            by_device[device] = by_device.get(device, 0) + size
            peak = max(peak, total)
            peak_by_device[device] = max(peak_by_device.get(device, 0), by_device[device])
        self.peak_bytes, self.current_bytes = peak, total
        self.peak_by_device = peak_by_device

    def _start_cuda(self) -> None:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
            self._cuda_before[index] = torch.cuda.memory_allocated(index)

    def _stop_cuda(self) -> None:
        if not self._cuda_before:
            return
        indices = [
            i
            for i in self._cuda_before
            if self.device in (None, "cuda") or self.device == f"cuda:{i}"
        ]
        self.cuda_max_allocated = sum(
            torch.cuda.max_memory_allocated(i) - self._cuda_before[i] for i in indices
        )
        self.cuda_max_reserved = sum(
            torch.cuda.max_memory_reserved(i) - self._cuda_before[i] for i in indices
        )


def _allocation_events(profiler: Any) -> Iterator[tuple[int, int, int, str, int]]:
    """(time in ns, signed bytes, address, device, order) of every allocator event the
    profiler recorded, on every thread (the autograd engine's device threads included);
    ``order`` follows the event tree depth first, each thread's events as they came."""
    from torch._C._profiler import _EventType

    try:
        roots = profiler.profiler.kineto_results.experimental_event_tree()
    except AttributeError as err:  # a private API: say so if it moves
        raise RematError(
            f"AllocationTracker: this PyTorch ({torch.__version__}) does not expose the "
            "profiler's event tree (kineto_results.experimental_event_tree)"
        ) from err
    stack = list(reversed(roots))
    order = 0
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            yield node.start_time_ns, f.alloc_size, f.ptr, str(f.device), order
            order += 1
        stack.extend(reversed(node.children))


def allocated_step_peak(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> int:
    """New bytes at the peak of one training step, from the allocators' events: the same
    figure as :func:`~remat.profiling.step.measure_step_peak` on an eager model, and one
    that sees inside ``torch.compile``'s code (pass the compiled model; compile it, and warm
    it up, first: compilation allocates too). Gradients are cleared before and after."""
    model.zero_grad(set_to_none=True)
    with AllocationTracker(device) as tracker:
        loss = loss_fn(model(*inputs, **(kwargs or {})))
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return tracker.peak_bytes
