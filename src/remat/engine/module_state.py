"""Module state a region's forward changes and its recomputation must see as it was: buffers
written in place or reassigned, and plain attributes reassigned (a counter, a recurrent
state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# Modules whose kernels update buffers without bumping their version counter:
# native_batch_norm's schema does not mark running_mean/running_var as mutated.
__all__ = ["ModuleState"]


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
