"""What recomputation must replay so that it sees exactly what the forward pass saw.

A checkpointed region runs twice: once in forward, once (partly) in backward. For the
second run to reproduce the first we capture, before the forward:

- the CPU RNG state and the RNG state of every CUDA device involved (dropout masks);
- the autocast state of CPU and CUDA;
- the default-device context (``with torch.device("meta"): ...``);
- the value of every module buffer the region may mutate (BatchNorm running stats).

During recomputation we restore all of it, and afterwards put back whatever recompute
changed: the global RNG stream and buffers end up as if no recomputation had happened.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# Qualified names of modules, filled in by whoever knows the root model (remat.apply), so
# that errors can say "blocks.3" rather than "Block".
_MODULE_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def register_module_names(root: nn.Module) -> None:
    """Remember the qualified name of every submodule of ``root`` for error messages."""
    for name, module in root.named_modules():
        _MODULE_NAMES[module] = name or type(root).__name__


def owner_module(fn: Any) -> nn.Module | None:
    """The module whose forward ``fn`` runs: the module itself, a bound method's owner, or
    the module of ``functools.partial(type(m).forward, m)`` (what ``remat.apply`` passes)."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    if isinstance(fn, functools.partial) and fn.args and isinstance(fn.args[0], nn.Module):
        return fn.args[0]
    return None


def describe_fn(fn: Any) -> str:
    """A human name for a checkpointed callable: its module's qualified name where known."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        name = _MODULE_NAMES.get(owner)
        kind = type(owner).__name__
        method = "" if owner is fn else f".{getattr(fn, '__name__', 'forward')}"
        return f"module '{name}' ({kind}{method})" if name else f"module {kind}{method}"
    if isinstance(fn, functools.partial):
        if fn.args and isinstance(fn.args[0], nn.Module):  # partial(type(m).forward, m)
            return describe_fn(fn.args[0])
        return f"partial({describe_fn(fn.func)})"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"function {getattr(fn, '__module__', None) or '?'}.{qualname}"


# ---------------------------------------------------------------------------------------
# Modules a region can touch: buffers to protect, parameters the function engine needs.
# ---------------------------------------------------------------------------------------


def reachable_modules(fn: Any, args: Sequence[Any]) -> list[nn.Module]:
    """Modules a checkpointed callable visibly uses.

    Looks at ``fn`` itself, the module a bound method belongs to, the parts of a
    ``functools.partial``, modules captured in a closure, and modules passed as arguments.
    A module reached only through a global variable is invisible here; the function engine
    detects that case from the autograd graph and refuses it.
    """
    found: dict[int, nn.Module] = {}
    stack: list[Any] = [fn, *args]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.setdefault(id(obj), obj)
            continue
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
            continue
        if isinstance(obj, functools.partial):
            stack.extend((obj.func, *obj.args, *obj.keywords.values()))
            continue
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, nn.Module):
            stack.append(owner)
        func = getattr(obj, "__func__", obj)
        for cell in getattr(func, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # empty cell
                contents = cell.cell_contents
                if isinstance(contents, (nn.Module, functools.partial)) or callable(contents):
                    stack.append(contents)
    return list(found.values())


def closure_tensors(fn: Any) -> list[Tensor]:
    """Tensors that require grad captured in ``fn``'s closure (a lambda over a weight)."""
    func = getattr(fn, "__func__", fn)
    out = []
    for cell in getattr(func, "__closure__", None) or ():
        with contextlib.suppress(ValueError):
            contents = cell.cell_contents
            if isinstance(contents, Tensor) and contents.requires_grad:
                out.append(contents)
    return out


# Modules whose kernels update buffers without bumping their version counter:
# native_batch_norm's schema does not mark running_mean/running_var as mutated.
_SILENT_MUTATORS = (nn.modules.batchnorm._NormBase,)


@dataclass(slots=True)
class BufferSnapshot:
    """Values of the buffers a region mutated, as they were before its forward.

    Buffers whose version counter did not move during the forward are dropped right after
    it, so only mutated buffers (BatchNorm statistics) cost memory until backward.
    Normalisation layers' buffers are always kept, since their kernels update the running
    statistics without touching the version counter.
    """

    entries: list[tuple[Tensor, Tensor, int, bool]] = field(default_factory=list)

    @classmethod
    def before_forward(cls, modules: Sequence[nn.Module]) -> BufferSnapshot:
        seen: set[int] = set()
        entries = []
        with torch.no_grad():
            for root in modules:
                for module in root.modules():
                    silent = isinstance(module, _SILENT_MUTATORS)
                    for buf in module.buffers(recurse=False):
                        if id(buf) in seen or buf.is_meta:
                            continue
                        seen.add(id(buf))
                        entries.append((buf, buf.clone(), buf._version, silent))
        return cls(entries)

    def keep_mutated(self) -> None:
        """After the forward: forget buffers the forward did not change."""
        self.entries = [e for e in self.entries if e[3] or e[0]._version != e[2]]

    @contextlib.contextmanager
    def as_before_forward(self) -> Iterator[None]:
        """Give mutated buffers their pre-forward values, and restore them afterwards.

        Both copies keep the buffers' version counters as they were: the net effect on the
        buffers is nil, and a graph outside the region that saved one of them must not see
        a spurious in-place modification.
        """
        if not self.entries:
            yield
            return
        buffers = tuple(entry[0] for entry in self.entries)
        versions = tuple(buf._version for buf in buffers)
        with torch.no_grad():
            now = [buf.clone() for buf in buffers]
            for buf, before, *_ in self.entries:
                buf.copy_(before)
        _set_versions(buffers, versions)
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in zip(buffers, now):
                    buf.copy_(value)
            _set_versions(buffers, versions)


def _set_versions(tensors: tuple[Tensor, ...], versions: tuple[int, ...]) -> None:
    setter = torch._C._autograd._unsafe_set_version_counter
    try:
        setter(tensors, versions)
    except TypeError:  # torch < 2.6 takes one tensor at a time
        for tensor, version in zip(tensors, versions):
            setter(tensor, version)


# ---------------------------------------------------------------------------------------
# RNG, autocast and device context.
# ---------------------------------------------------------------------------------------

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


def _device_context() -> Any:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return mode
    return None


@dataclass(slots=True)
class ForwardState:
    """Everything captured before a region's forward that its recomputation replays."""

    preserve_rng_state: bool
    cpu_rng: Tensor | None
    cuda_devices: list[int]
    cuda_rng: list[Tensor]
    cuda_was_initialized: bool
    autocast: dict[str, tuple[bool, torch.dtype, bool]]
    device_context: Any
    buffers: BufferSnapshot

    @classmethod
    def capture(
        cls,
        tensors: Sequence[Tensor],
        modules: Sequence[nn.Module],
        *,
        preserve_rng_state: bool,
    ) -> ForwardState:
        cuda_devices = _cuda_devices(tensors) if preserve_rng_state else []
        return cls(
            preserve_rng_state=preserve_rng_state,
            cpu_rng=torch.get_rng_state() if preserve_rng_state else None,
            cuda_devices=cuda_devices,
            cuda_rng=[torch.cuda.get_rng_state(d) for d in cuda_devices],
            cuda_was_initialized=torch.cuda.is_available() and torch.cuda.is_initialized(),
            autocast={d: _autocast_state(d) for d in _AUTOCAST_DEVICES},
            device_context=_device_context(),
            buffers=BufferSnapshot.before_forward(modules),
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
        """Run the body as the forward ran: same RNG, autocast, device context, buffers."""
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
            stack.enter_context(self.buffers.as_before_forward())
            yield
