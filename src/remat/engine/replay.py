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
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from remat.errors import CheckpointError
from remat.measure.versions import ReadVersions

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
class _Buffer:
    """One module buffer as it was before a region's forward."""

    module: nn.Module
    name: str
    tensor: Tensor  # the object registered before the forward
    # A copy of its values then; None for a training batch norm's statistics, which its
    # output does not read (it normalises by the batch's own), so recomputation only has to
    # leave them as it found them, and no copy is held from forward to backward.
    value: Tensor | None
    version: int


@dataclass(slots=True)
class ModuleState:
    """The module state a region changed (buffers, plain attributes), as it was before its
    forward.

    A buffer changes in two ways: written in place (BatchNorm statistics, a step counter
    ``self.steps += 1``) or reassigned (``self.steps = self.steps + 1`` registers a new
    tensor). Recomputation must see both as they were, or the buffer advances twice and
    whatever it feeds is computed from the wrong value. Plain module attributes the forward
    reassigns (a tensor of recurrent state, a call counter) are replayed the same way.
    Buffers neither written nor reassigned during the forward are dropped right after it,
    so only changed buffers cost memory until backward. Normalisation layers' statistics
    are always restored after recomputation, since their kernels update them without
    touching the version counter.
    """

    written: list[_Buffer] = field(default_factory=list)
    reassigned: list[_Buffer] = field(default_factory=list)
    # Plain attributes (see _ATTRIBUTE_TYPES) of each module before the forward, then those
    # the forward changed: (module, name, value before or _MISSING).
    attributes_before: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    attributes: list[tuple[nn.Module, str, Any]] = field(default_factory=list)

    @classmethod
    def before_forward(cls, modules: Sequence[nn.Module]) -> ModuleState:
        seen: set[int] = set()
        entries = []
        attributes = []
        with torch.no_grad():
            for root in modules:
                for module in root.modules():
                    if id(module) in seen:
                        continue
                    seen.add(id(module))
                    attributes.append((module, _plain_attributes(module)))
                    write_only = isinstance(module, _SILENT_MUTATORS) and module.training
                    for name, buf in module._buffers.items():
                        if buf is None or buf.is_meta:
                            continue
                        value = None if write_only else buf.clone()
                        entries.append(_Buffer(module, name, buf, value, buf._version))
        return cls(written=entries, attributes_before=attributes)

    def keep_changed(self) -> None:
        """After the forward: forget buffers and attributes the forward did not change."""
        entries = self.written
        self.written = [e for e in entries if e.value is None or e.tensor._version != e.version]
        self.reassigned = [e for e in entries if e.module._buffers.get(e.name) is not e.tensor]
        changed = []
        for module, before in self.attributes_before:
            after = _plain_attributes(module)
            for name in before.keys() | after.keys():
                if before.get(name, _MISSING) is not after.get(name, _MISSING):
                    changed.append((module, name, before.get(name, _MISSING)))
        self.attributes, self.attributes_before = changed, []

    def unchanged(self, modules: Sequence[nn.Module]) -> list[Tensor]:
        """The buffers of ``modules`` this snapshot does not replay."""
        replayed = {id(e.tensor) for e in self.written}
        replayed.update(id(e.module._buffers.get(e.name)) for e in self.reassigned)
        return [
            buf
            for root in modules
            for buf in root.buffers()
            if id(buf) not in replayed and not buf.is_meta
        ]

    @contextlib.contextmanager
    def as_before_forward(self) -> Iterator[None]:
        """Give changed buffers their pre-forward values, and restore them afterwards.

        Both copies keep the buffers' version counters as they were: the net effect on the
        buffers is nil, and a graph outside the region that saved one of them must not see
        a spurious in-place modification. Reassigned buffers get their pre-forward tensor
        back for the recomputation, then the tensor registered now.
        """
        if not self.written and not self.reassigned and not self.attributes:
            yield
            return
        buffers = tuple(entry.tensor for entry in self.written)
        versions = tuple(buf._version for buf in buffers)
        registered = [e.module._buffers.get(e.name) for e in self.reassigned]
        with torch.no_grad():
            now = [buf.clone() for buf in buffers]
            for entry in self.written:
                if entry.value is not None:
                    entry.tensor.copy_(entry.value)
        _set_versions(buffers, versions)
        for entry in self.reassigned:
            entry.module._buffers[entry.name] = entry.tensor
        now_attributes = [m.__dict__.get(name, _MISSING) for m, name, _ in self.attributes]
        for module, name, before in self.attributes:
            _set_attribute(module, name, before)
        try:
            yield
        finally:
            for (module, name, _), value in zip(self.attributes, now_attributes):
                _set_attribute(module, name, value)
            for entry, tensor in zip(self.reassigned, registered):
                entry.module._buffers[entry.name] = tensor
            with torch.no_grad():
                for buf, value in zip(buffers, now):
                    buf.copy_(value)
            _set_versions(buffers, versions)


# Module attributes a forward may change that recomputation must see as they were: state
# kept on the module (RecurrentGemma's ``self.conv1d_state``, a call counter). Containers
# and objects are left alone: copying them on every forward would cost too much.
_ATTRIBUTE_TYPES = (Tensor, int, float, bool, str, type(None))
_MISSING = object()


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {
        name: value
        for name, value in module.__dict__.items()
        if isinstance(value, _ATTRIBUTE_TYPES) and name != "training"
    }


def _set_attribute(module: nn.Module, name: str, value: Any) -> None:
    if value is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def _set_versions(tensors: tuple[Tensor, ...], versions: tuple[int, ...]) -> None:
    setter = torch._C._autograd._unsafe_set_version_counter
    try:
        setter(tensors, versions)
    except TypeError:  # torch < 2.6 takes one tensor at a time
        for tensor, version in zip(tensors, versions):
            setter(tensor, version)


# ---------------------------------------------------------------------------------------
# KV caches: Python objects a region appends to.
# ---------------------------------------------------------------------------------------


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


def _rng_now() -> tuple[Tensor, list[int]]:
    """The CPU generator's state and each initialised CUDA generator's offset."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [g.get_offset() for g in torch.cuda.default_generators]
    return torch.get_rng_state(), cuda


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
            module_state=ModuleState.before_forward(modules),
            modules=modules,
            inputs=[(t, t._version) for t in tensors if not t.is_inference()],
            rng_before=None if preserve_rng_state else _rng_now(),
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
