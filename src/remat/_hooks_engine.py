"""The ``engine="hooks"`` checkpoint: ``saved_tensors_hooks`` drop saved tensors, backward
recomputes them.

In forward, every tensor autograd wants to save inside the region is replaced by a small
``_Holder``; only the region's inputs are really saved (by a no-op autograd node, so that an
enclosing checkpoint manages them like any other saved tensor). The first time backward
unpacks a holder, the region is re-run from its inputs under a second pair of hooks that
hand each recomputed tensor to its holder, in order, and stop as soon as the last needed
one is back (``early_stop``).

The design follows PyTorch's non-reentrant checkpoint (torch/utils/checkpoint.py, "Nestable
Checkpoint" notes): recomputed tensors are keyed by the backward call (graph task) that
needs them, so ``torch.autograd.grad``, several backward calls, ``retain_graph`` and double
backward all work, and are freed as soon as they are unpacked. On top of it remat replays
buffers (BatchNorm statistics change once, not twice) and reports determinism failures
with the region's name, the tensor's position and the op that produced it.
"""

from __future__ import annotations

import contextlib
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat import _determinism
from remat._replay import ForwardState
from remat.errors import CheckpointError


class _Handle:
    """Key of one recomputed tensor in a frame's per-backward weak dictionary."""

    __slots__ = ("__weakref__",)


class _Holder:
    """What autograd stores instead of a saved tensor: one handle per backward call."""

    __slots__ = ("__weakref__", "handles")

    def __init__(self) -> None:
        self.handles: dict[int, _Handle | None] = {}


class _StopRecomputation(Exception):
    """Raised inside recomputation once every saved tensor is back (early stop)."""


class _SaveInputs(torch.autograd.Function):
    """Saves the region's inputs as ordinary saved tensors.

    Being saved tensors, they go through the enclosing checkpoint's hooks (if any), which is
    what makes nesting work: to recompute an inner region, its inputs are first recomputed
    by the outer one. The node's output is a throwaway empty tensor; it is never
    differentiated.
    """

    @staticmethod
    def forward(dummy: Tensor, *tensors: Tensor) -> Tensor:
        return torch.empty((0,), device=dummy.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> None:  # pragma: no cover - never reached
        raise CheckpointError("remat internal error: the input-saving node was differentiated")


def _graph_task_id() -> int:
    gid = torch._C._current_graph_task_id()
    # -1 means "not inside backward" (e.g. someone read grad_fn._saved_self): give that
    # unpack its own recomputation.
    return gid if gid != -1 else uuid.uuid4().int


class _Frame:
    """Book-keeping of one checkpointed call, alive as long as its autograd graph."""

    def __init__(
        self, region: str, run: Callable[[list[Any]], Any], early_stop: bool, check: str
    ) -> None:
        self.region = region
        self.run = run
        self.early_stop = early_stop
        self.check = check
        self.inputs_node: Any = None
        self.flat_inputs: list[Any] = []
        self.tensor_positions: list[int] = []
        self.weak_holders: list[weakref.ref[_Holder]] = []
        self.records: list[_determinism.TensorRecord] = []
        self.recomputed: defaultdict[int, weakref.WeakKeyDictionary[_Handle, Tensor]] = defaultdict(
            weakref.WeakKeyDictionary
        )
        self.counter: defaultdict[int, int] = defaultdict(int)
        self.is_recomputed: defaultdict[int, bool] = defaultdict(bool)
        self.forward_completed = False
        self.ignore_count_mismatch = False

    def save_inputs(self, flat: list[Any]) -> None:
        self.tensor_positions = [i for i, x in enumerate(flat) if isinstance(x, Tensor)]
        tensors = [flat[i] for i in self.tensor_positions]
        # Non-tensor leaves are kept as they are; tensors go into the no-op node.
        self.flat_inputs = [None if isinstance(x, Tensor) else x for x in flat]
        device = tensors[0].device if tensors else torch.device("cpu")
        dummy = torch.empty((0,), device=device, requires_grad=True)
        self.inputs_node = _SaveInputs.apply(dummy, *tensors).grad_fn

    def load_inputs(self) -> list[Any]:
        leaves = list(self.flat_inputs)
        for position, tensor in zip(self.tensor_positions, self.inputs_node.saved_tensors):
            leaves[position] = tensor
        return leaves

    def recompute(self, gid: int) -> None:
        leaves = self.load_inputs()
        try:
            with _RecomputeHooks(self, gid), torch.enable_grad():
                self.run(leaves)
        except _StopRecomputation:
            pass
        self.is_recomputed[gid] = True
        if not self.ignore_count_mismatch and self.counter[gid] != len(self.weak_holders):
            raise _determinism.count_error(self.region, len(self.weak_holders), self.counter[gid])


class _ForwardHooks(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, frame: _Frame) -> None:
        def pack(x: Tensor) -> _Holder:
            holder = _Holder()
            frame.weak_holders.append(weakref.ref(holder))
            if frame.check != "none":
                frame.records.append(_determinism.record(x, frame.check))
            return holder

        def unpack(holder: _Holder) -> Tensor:
            gid = _graph_task_id()
            if not frame.is_recomputed[gid]:
                frame.recompute(gid)
            handle = holder.handles.get(gid)
            if handle is None:
                raise CheckpointError(
                    f"remat.checkpoint: a tensor saved in {frame.region} was unpacked twice in "
                    "one backward call. If a custom autograd.Function reads ctx.saved_tensors "
                    "more than once in backward, read it once into a local variable."
                )
            tensor = frame.recomputed[gid][handle]
            holder.handles[gid] = None  # free it now, even with retain_graph=True
            return tensor

        super().__init__(pack, unpack)


class _RecomputeHooks(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, target: _Frame, gid: int) -> None:
        # Only a weak reference: the hook object outlives the recomputation (the
        # _StopRecomputation raised through autograd's C++ code keeps it referenced), and a
        # strong one would keep the frame and all its recomputed tensors alive after backward.
        frame_ref = weakref.ref(target)

        def pack(x: Tensor) -> Tensor:
            frame = frame_ref()
            if frame is None:  # pragma: no cover - the frame outlives its own recomputation
                return x
            x_saved = x.detach() if x.requires_grad else x
            index = frame.counter[gid]
            frame.counter[gid] += 1
            if index >= len(frame.weak_holders):
                if not frame.forward_completed:
                    # backward inside the region's own forward with early stop off: the
                    # forward is still saving, so counts cannot be compared yet.
                    frame.ignore_count_mismatch = True
                    return x_saved
                raise _determinism.count_error(frame.region, len(frame.weak_holders), index + 1)
            holder = frame.weak_holders[index]()
            if holder is not None:  # None: already used by an earlier backward, skip it
                if frame.check != "none":
                    forward = frame.records[index]
                    again = _determinism.record(x, frame.check)
                    if not forward.same_as(again):
                        raise _determinism.mismatch_error(
                            frame.region, "saved tensor", index, forward, again
                        )
                handle = _Handle()
                holder.handles[gid] = handle
                frame.recomputed[gid][handle] = x_saved
            if frame.early_stop and frame.counter[gid] == len(frame.weak_holders):
                raise _StopRecomputation
            # Detached: a saved *output* packed with its grad_fn would form a reference
            # cycle node -> saved variable -> tensor -> node that is never freed. Autograd
            # re-attaches the history on unpack, so backward inside the region still works.
            return x_saved

        super().__init__(pack, lambda x: x)


def checkpoint_hooks(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    region: str,
    state: ForwardState,
    early_stop: bool,
    determinism_check: str,
    context_fn: Callable[[], tuple[ContextManager[Any], ContextManager[Any]]] | None = None,
) -> Any:
    """Run ``fn(*args, **kwargs)`` keeping only its inputs for backward.

    ``context_fn`` returns a pair of context managers entered around the forward and the
    recomputation respectively (op-level policies use it for their dispatch modes).
    """
    flat, spec = tree_flatten((args, kwargs))
    forward_ctx, recompute_ctx = (
        context_fn() if context_fn else (contextlib.nullcontext(), contextlib.nullcontext())
    )

    def run(leaves: list[Any]) -> None:
        r_args, r_kwargs = tree_unflatten(leaves, spec)
        with state.replay(), recompute_ctx:
            fn(*r_args, **r_kwargs)

    frame = _Frame(region, run, early_stop, determinism_check)
    frame.save_inputs(flat)
    with _ForwardHooks(frame), forward_ctx:
        out = fn(*args, **kwargs)
    frame.forward_completed = True
    state.buffers.keep_mutated()
    return out
