"""The op-tape engine of op-level checkpointing: recompute single saved tensors, not regions.

The replay engine (selective checkpointing in torch.utils.checkpoint) re-runs the region's
Python forward in backward under a dispatch mode that hands back the kept outputs. That
re-run rebuilds the region's autograd graph and dispatches every op again, even when
almost every op's output is kept: 3.1-3.2 ms per block of the benchmark GPT on this
machine's CPU, whatever is dropped, against 0.4-0.7 ms for this engine.

This engine records instead. In forward a dispatch mode writes down, for every op in the
region, how to compute its outputs again: the aten op and its arguments, where a tensor
argument produced by another dropped op is that op's recipe and any other tensor (a kept
output, a region input, a parameter) is held. When autograd saves a tensor for backward, a
``saved_tensors_hooks`` pack hook looks up who produced it: a kept op's output is saved as
usual, a dropped op's output is replaced by its recipe and computed again (with the recipes
it depends on) when backward unpacks it. Nothing is replayed at the Python level, no
autograd graph is rebuilt, and a dropped op that no saved tensor needs is never recomputed.

Ops run at the aten level after autocast, so recipes already carry the cast arguments.
Random ops and ops that write to a tensor are always kept: their outputs cannot be
recomputed from their arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from remat.engine import determinism
from remat.errors import CheckpointError
from remat.measure.versions import Versioned, modified_error

_DETACH = torch.ops.aten.detach.default


def _key(t: Tensor) -> tuple[Any, ...] | None:
    """Memory and geometry: one key is one tensor's values (or a view's with equal values)
    as long as nothing writes to its storage in between, which is why a write marks every
    key of the written storage kept. ``None`` for tensor subclasses and sparse tensors:
    never dropped."""
    if type(t) is not Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    if t.layout != torch.strided:  # sparse: no single address
        return None
    # Meta tensors all have address 0: tell them apart by storage.
    where = (t.untyped_storage()._cdata, t.storage_offset()) if t.is_meta else t.data_ptr()
    return (where, t.shape, t.stride(), t.dtype, t.device)


def _storage_key(t: Tensor) -> int:
    """The storage behind a keyed tensor (``_key`` is not ``None``, so it has one)."""
    return t.untyped_storage()._cdata


def _alias(t: Tensor) -> Tensor:
    # Held tensors are detached aliases: holding the autograd tensor itself would form a
    # cycle (node -> saved recipe -> tensor -> node) that is never freed. The detach runs
    # with ADInplaceOrView on so the alias shares the version counter that is checked later.
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return t.detach()


class _Held:
    """A tensor a recipe needs as it was in forward (checked by its version counter)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = _alias(tensor)
        self.version = tensor._version


class _Ref:
    """Output ``index`` of another dropped op."""

    __slots__ = ("index", "recipe")

    def __init__(self, recipe: _Recipe, index: int) -> None:
        self.recipe = recipe
        self.index = index


class _Recipe:
    """How to compute one dropped op's outputs again."""

    __slots__ = ("args", "consumers", "func", "held", "kwargs", "pending", "region")

    def __init__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], region: str):
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.region = region
        # A recipe several saved tensors or recipes depend on (a base and its views, the
        # q, k, v split of one matmul) is computed once per backward: its outputs are held
        # until each of its ``consumers`` (counted after the forward) has taken them.
        self.consumers = 0
        self.held: list[Any] | None = None
        self.pending = 0

    def output(self, index: int) -> Tensor:
        outputs = self.held
        if outputs is None:
            outputs = self.compute()
            self.pending = self.consumers
        self.pending -= 1
        self.held = outputs if self.pending > 0 else None
        return outputs[index]

    def compute(self) -> list[Any]:
        args = tuple(self._resolve(a) for a in self.args)
        kwargs = {k: self._resolve(v) for k, v in self.kwargs.items()} if self.kwargs else {}
        out = self.func(*args, **kwargs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, _Ref):
            return value.recipe.output(value.index)
        if isinstance(value, _Held):
            if value.tensor._version != value.version:
                what = f"a tensor that recomputing {self.func} needs"
                raise modified_error(value.tensor, value.version, self.region, what)
            return value.tensor
        if isinstance(value, (list, tuple)):
            return type(value)(self._resolve(v) for v in value)
        return value


_KEPT = object()  # marks a key whose tensor is saved as it is


# Ops that write to an argument without saying so in their schema: batch norm updates its
# running statistics in place (the annotated form is _native_batch_norm_legit).
_UNANNOTATED_WRITERS = frozenset({"native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"})
_WRITES: dict[Any, bool] = {}


def writes_to_arguments(func: Any) -> bool:
    """Whether an aten op writes to one of its arguments (in-place, ``out=``, or batch
    norm's running statistics): its outputs cannot be recomputed from its arguments."""
    writes = _WRITES.get(func)
    if writes is None:
        schema = func._schema
        writes = schema.is_mutable or func.overloadpacket.__name__ in _UNANNOTATED_WRITERS
        _WRITES[func] = writes
    return writes


class _RecordingMode(TorchDispatchMode):
    """Runs the region's forward and writes a recipe for every op it does not keep."""

    def __init__(self, saves: Callable[[Any, tuple[Any, ...], dict[str, Any]], bool], region: str):
        super().__init__()
        self.saves = saves
        self.region = region
        self.produced: dict[tuple[Any, ...], Any] = {}
        # The keys produced in each storage: a write through any view of a storage makes
        # every tensor in it unrecomputable from the op that made it (``y = x.new_empty(n)``
        # then ``y[:k].copy_(a)``: the factory's recipe would give the empty tensor).
        self.keys_in_storage: dict[int, list[tuple[Any, ...]]] = {}
        # The tensors recipes hold, by storage: a write into one during the forward copies
        # it first, so the recipes read what it held when they took it.
        self.held_in_storage: dict[int, list[_Held]] = {}
        self.packed: list[_Ref] = []  # every dropped output autograd saved, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        writes = func is not _DETACH and writes_to_arguments(func)
        if writes and self.held_in_storage:
            self._copy_held_before_write((*args, *kwargs.values()))
        out = func(*args, **kwargs)
        if func is _DETACH:  # same memory and geometry: its input's entry describes it
            return out
        if writes:
            # Written storages now hold values no earlier recipe describes, whichever view
            # the write went through (a list argument counts too: _foreach_mul_ writes to
            # every tensor in it). Recipes that already took one of their tensors keep
            # what it held then; from now on its tensors are kept as they are.
            for a in _items((*args, *kwargs.values()), Tensor):
                if _key(a) is not None:
                    self._mark_written(a)
            self._register(out, None)
        elif self.saves(func, args, kwargs):
            self._register(out, None)
        else:
            recipe = _Recipe(
                func,
                tuple(self._translate(a) for a in args),
                {k: self._translate(v) for k, v in kwargs.items()},
                self.region,
            )
            self._register(out, recipe)
        return out

    def _register(self, out: Any, recipe: _Recipe | None) -> None:
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for index, o in enumerate(outputs):
            key = _key(o) if isinstance(o, Tensor) else None
            if key is not None:
                self.produced[key] = _KEPT if recipe is None else _Ref(recipe, index)
                self.keys_in_storage.setdefault(_storage_key(o), []).append(key)

    def _mark_written(self, tensor: Tensor) -> None:
        storage = _storage_key(tensor)
        for key in self.keys_in_storage.get(storage, ()):
            self.produced[key] = _KEPT
        self.produced[_key(tensor)] = _KEPT
        self.keys_in_storage.setdefault(storage, []).append(_key(tensor))

    def _copy_held_before_write(self, written: tuple[Any, ...]) -> None:
        """A tensor a recipe holds is about to be written (a region input, a cache state):
        the recipe gets a copy of it as it is now, as it would if it had been saved."""
        for tensor in _items(written, Tensor):
            if _key(tensor) is None:
                continue
            for held in self.held_in_storage.pop(_storage_key(tensor), ()):
                if held.tensor._version == held.version:
                    held.tensor = held.tensor.clone()
                    held.version = held.tensor._version

    def _translate(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            entry = self.produced.get(_key(value))
            if isinstance(entry, _Ref):
                return entry
            held = _Held(value)
            if _key(value) is not None:
                self.held_in_storage.setdefault(_storage_key(value), []).append(held)
            return held
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(self._translate(v) for v in value)
        return value


class _Packed:
    """What autograd saves instead of a dropped op's output (the ``position``-th)."""

    __slots__ = ("position", "record", "ref")

    def __init__(self, ref: _Ref, position: int, record: determinism.TensorRecord | None) -> None:
        self.ref = ref
        self.position = position
        self.record = record


class _TapeHooks(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, mode: _RecordingMode, check: str) -> None:
        produced, region = mode.produced, mode.region

        def pack(x: Tensor) -> Any:
            entry = produced.get(_key(x))
            if not isinstance(entry, _Ref):
                return Versioned(x)
            mode.packed.append(entry)
            record = None
            if check != "none":
                # Outside the mode: a "values" fingerprint runs ops of its own.
                with _disable_current_modes():
                    record = determinism.record(x, check)
            return _Packed(entry, len(mode.packed) - 1, record)

        def unpack(packed: Any) -> Tensor:
            if isinstance(packed, Versioned):
                return packed.unpack(region)
            # Grad mode on as in the forward (mkldnn's LSTM returns its workspace only
            # then); every argument is detached, so no graph is recorded. Autocast off on
            # every device: recipes hold arguments it already cast (AOTAutograd runs its
            # traced backward under the same guard).
            with torch.enable_grad(), torch._C._DisableAutocast():
                x = packed.ref.recipe.output(packed.ref.index)
            if not isinstance(x, Tensor):
                raise CheckpointError(
                    f"remat.ops(engine='tape'): recomputing {packed.ref.recipe.func} in "
                    f"{region} gave {type(x).__name__} where the forward gave a tensor. Use "
                    "the replay engine (remat.ops(..., engine='replay')) for this region."
                )
            if packed.record is not None:
                again = determinism.record(x, check)
                if not packed.record.same_as(again):
                    raise determinism.mismatch_error(
                        region, "saved tensor", packed.position, packed.record, again
                    )
            return x

        super().__init__(pack, unpack)


def checkpoint_tape(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    region: str,
    saves: Callable[[Any, tuple[Any, ...], dict[str, Any]], bool],
    determinism_check: str,
) -> Any:
    """Run ``fn(*args, **kwargs)``, saving the outputs of the ops ``saves`` accepts and
    recomputing each other saved tensor from its recipe when backward needs it."""
    if not torch.is_grad_enabled():  # no_grad / inference_mode: nothing to save
        return fn(*args, **kwargs)
    mode = _RecordingMode(saves, region)
    try:
        with _TapeHooks(mode, determinism_check), mode:
            out = fn(*args, **kwargs)
        _count_consumers(mode.packed)
        return out
    finally:
        # Recipes no saved tensor needs, and the tensors only they hold, are freed now.
        mode.produced.clear()
        mode.keys_in_storage.clear()
        mode.held_in_storage.clear()
        mode.packed.clear()


def _items(value: Any, kind: type) -> list[Any]:
    """The ``kind`` instances in ``value``, looking into lists and tuples."""
    if isinstance(value, kind):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _items(v, kind)]
    return []


def _count_consumers(packed: list[_Ref]) -> None:
    """Count, for every recipe backward may compute, how many times its outputs are taken:
    once per saved tensor it gives and once per argument of a recipe that needs it."""
    visited: set[int] = set()
    stack: list[_Recipe] = []
    for ref in packed:
        ref.recipe.consumers += 1
        stack.append(ref.recipe)
    while stack:
        recipe = stack.pop()
        if id(recipe) in visited:
            continue
        visited.add(id(recipe))
        for value in (*recipe.args, *recipe.kwargs.values()):
            for ref in _items(value, _Ref):
                ref.recipe.consumers += 1
                stack.append(ref.recipe)
