"""What recomputation must replay so that it sees exactly what the forward pass saw.

A checkpointed region runs twice: once in forward, once (partly) in backward. For the
second run to reproduce the first we capture, before the forward:

- the CPU RNG state and the RNG state of every CUDA device involved (dropout masks);
- the autocast state of CPU and CUDA;
- the default-device context (``with torch.device("meta"): ...``);
- the value of every module buffer the region may mutate (BatchNorm running stats), and
  the buffers and plain attributes it may reassign (a counter, a recurrent state);
- the structure of every KV cache it is given (transformers' ``Cache``), which it appends to.

During recomputation we restore all of it, and afterwards put back whatever recompute
changed: the global RNG stream and buffers end up as if no recomputation had happened.
What the region reads and cannot be replayed (its parameters) is version-checked instead.

Restoring the RNG state is not enough when another thread draws from the same generator
(a data-augmentation thread calling ``torch.rand``): it may draw between the state capture
and the region's dropout, or during the recomputation, and the masks differ. That cannot be
prevented from here, so it is detected: :class:`RandomDraws` tells the determinism check
from which saved tensor on the region's values may depend on a draw
(:mod:`remat.engine.determinism` fingerprints those).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from remat.engine.module_state import ModuleState
from remat.errors import CheckpointError
from remat.measure.versions import ReadVersions

__all__ = ["ForwardState", "RandomDraws"]


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype, bool]:
    return (
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_cache_enabled(),
    )


def _cuda_devices(tensors: Sequence[Tensor]) -> list[int]:
    # Never initialise CUDA just to ask: a CPU-only run must stay CPU-only.
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = {t.device.index for t in tensors if t.is_cuda}
    devices.add(torch.cuda.current_device())
    return sorted(d for d in devices if d is not None)


def _rng_now() -> tuple[Tensor, list[int]]:
    """The CPU generator's state and each initialised CUDA generator's offset."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [g.get_offset() for g in torch.cuda.default_generators]
    return torch.get_rng_state(), cuda


class RandomDraws:
    """Whether the generators a recomputation replays (the CPU one, and those of the CUDA
    devices it replays) have drawn since a region's forward began.

    The region's own random ops or another thread's, which cannot be told apart: either way
    the tensors saved from then on may hold drawn numbers. One look costs about a
    microsecond (the CPU generator's 5 kB state; a CUDA generator's seed and offset are
    host-side counters, read without synchronising), and none once a draw was seen.
    """

    __slots__ = ("_cpu", "_cuda", "seen")

    def __init__(self, cpu_state: Tensor, cuda_devices: Sequence[int]) -> None:
        self._cpu = cpu_state
        generators = [torch.cuda.default_generators[d] for d in cuda_devices]
        self._cuda = [(g, g.initial_seed(), g.get_offset()) for g in generators]
        self.seen = False

    def since_start(self) -> bool:
        if not self.seen:
            # Outside any dispatch mode (fake tensors, a tracker): this compares real states.
            with _disable_current_modes():
                self.seen = self._drew()
        return self.seen

    def _drew(self) -> bool:
        return any(
            g.get_offset() != offset or g.initial_seed() != seed for g, seed, offset in self._cuda
        ) or not torch.equal(torch.default_generator.get_state(), self._cpu)


def _device_context() -> Any:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return mode
    return None


@dataclass(slots=True)
class ForwardState:
    """Everything captured before a region's forward that its recomputation replays, and
    the versions of what it reads, which recomputation checks."""

    preserve_rng_state: bool
    cpu_rng: Tensor | None
    cuda_devices: list[int]
    cuda_rng: list[Tensor]
    cuda_was_initialized: bool
    autocast: dict[str, tuple[bool, torch.dtype, bool]]
    device_context: Any
    module_state: ModuleState
    modules: Sequence[nn.Module]
    inputs: list[tuple[Tensor, int]]  # (input, version before the forward), until it ends
    reads: ReadVersions = field(default_factory=ReadVersions)
    region: str = "the region"
    # Without preserve_rng_state: the RNG before the forward, to tell whether it drew.
    rng_before: tuple[Tensor, list[int]] | None = None
    # With it: whether the replayed generators drew since (the determinism check's cue).
    draws: RandomDraws | None = None

    @classmethod
    def capture(
        cls,
        tensors: Sequence[Tensor],
        modules: Sequence[nn.Module],
        *,
        preserve_rng_state: bool,
    ) -> ForwardState:
        cuda_devices = _cuda_devices(tensors) if preserve_rng_state else []
        cpu_rng = torch.get_rng_state() if preserve_rng_state else None
        return cls(
            preserve_rng_state=preserve_rng_state,
            cpu_rng=cpu_rng,
            cuda_devices=cuda_devices,
            cuda_rng=[torch.cuda.get_rng_state(d) for d in cuda_devices],
            cuda_was_initialized=torch.cuda.is_available() and torch.cuda.is_initialized(),
            autocast={d: _autocast_state(d) for d in _AUTOCAST_DEVICES},
            device_context=_device_context(),
            module_state=ModuleState.before_forward(modules),
            modules=modules,
            inputs=[(t, t._version) for t in tensors if not t.is_inference()],
            rng_before=None if preserve_rng_state else _rng_now(),
            draws=RandomDraws(cpu_rng, cuda_devices) if cpu_rng is not None else None,
        )

    def watch_inputs(self, tensors: Sequence[Tensor]) -> None:
        """Check only ``tensors`` (of the inputs given to :meth:`capture`) for writes."""
        keep = {id(t) for t in tensors}
        self.inputs = [(t, v) for t, v in self.inputs if id(t) in keep]

    def after_forward(self, region: str, extra_reads: Sequence[Tensor] = ()) -> None:
        """Check the forward left its inputs alone; keep what recomputation replays and
        checks (changed buffers; versions of parameters and unchanged buffers).

        Raises:
            CheckpointError: the region wrote one of its inputs in place, so recomputing it
                from that input would start from the written values.
        """
        self.region = region
        inputs, self.inputs = self.inputs, []
        for position, (tensor, version) in enumerate(inputs):
            if tensor._version != version:
                raise CheckpointError(
                    f"remat.checkpoint: {region} writes its input tensor #{position} (shape "
                    f"{list(tensor.shape)}) in place, so recomputing it in backward would start "
                    "from the written values. Make that operation out of place (e.g. "
                    "nn.ReLU(inplace=False)), leave this module out of checkpointing, or use "
                    "remat.ops(..., engine='tape'), which recomputes single tensors."
                )
        if self.rng_before is not None:
            self._warn_if_random(region)
        self.module_state.keep_changed()
        parameters = [p for m in self.modules for p in m.parameters()]
        self.reads.record([*parameters, *self.module_state.unchanged(self.modules), *extra_reads])
        self.modules = ()

    def _warn_if_random(self, region: str) -> None:
        (cpu, cuda), self.rng_before = self.rng_before, None
        now_cpu, now_cuda = _rng_now()
        if cuda == now_cuda and torch.equal(cpu, now_cpu):
            return
        warnings.warn(
            f"remat.checkpoint: {region} drew random numbers (dropout?) with "
            "preserve_rng_state=False: its recomputation draws other ones, so its gradients "
            "are not those of the forward. Leave preserve_rng_state on for regions with "
            "random ops.",
            UserWarning,
            stacklevel=4,
        )

    def cuda_initialized_during_forward(self) -> bool:
        """True when the forward initialised CUDA, so its CUDA RNG state was not captured."""
        return (
            self.preserve_rng_state
            and not self.cuda_was_initialized
            and torch.cuda.is_available()
            and torch.cuda.is_initialized()
        )

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body as the forward ran: same RNG, autocast, device context, buffers.

        Raises:
            CheckpointError: a parameter or buffer the region read was modified in place
                since its forward (an optimizer step before backward).
        """
        self.reads.check(self.region)
        with contextlib.ExitStack() as stack:
            if self.preserve_rng_state:
                stack.enter_context(torch.random.fork_rng(devices=self.cuda_devices))
                torch.set_rng_state(self.cpu_rng)
                for device, state in zip(self.cuda_devices, self.cuda_rng):
                    torch.cuda.set_rng_state(state, device)
            for device_type, (enabled, dtype, cache) in self.autocast.items():
                # Enter autocast only where it differs from now (the usual backward has it
                # off everywhere), so a CPU-only run never touches CUDA's autocast.
                now_enabled, now_dtype, _ = _autocast_state(device_type)
                if enabled != now_enabled or (enabled and dtype != now_dtype):
                    stack.enter_context(
                        torch.autocast(
                            device_type, enabled=enabled, dtype=dtype, cache_enabled=cache
                        )
                    )
            if self.device_context is not None:
                stack.enter_context(self.device_context)
            stack.enter_context(self.module_state.as_before_forward())
            yield
