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
buffers (BatchNorm statistics change once, not twice) and KV caches (appended to once),
checks that what the region reads was not changed in place before it is recomputed, and
reports determinism failures with the region's name, the tensor's position and the op that
produced it.

A region may span several calls (a segment of blocks, :mod:`remat.policy.segment`): one
:class:`Frame` records each call, which of its arguments came out of an earlier call of
the frame (recomputed, not kept) and which are the region's inputs, and backward reruns
the calls as the model made them.
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

from remat.engine import determinism
from remat.engine.caches import fresh_caches, snapshot_caches
from remat.engine.region_modules import closure_tensors
from remat.engine.replay import ForwardState, RandomDraws
from remat.errors import CheckpointError
from remat.measure.versions import checked_version


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


class _Call:
    """One call run inside a frame: what its recomputation needs to run it again."""

    __slots__ = ("flat", "inputs_node", "run", "sources")

    def __init__(
        self,
        run: Callable[[list[Any]], Any],
        flat: list[Any],
        sources: dict[int, tuple[int, int] | None],
        inputs_node: Any,
    ) -> None:
        self.run = run  # leaves -> output, under the call's replayed state
        self.flat = flat  # the call's pytree leaves, None where a tensor goes
        # Per tensor position: (call, leaf) when the tensor is an earlier call's output in
        # the same frame (recomputed, not kept), None when it is saved in inputs_node.
        self.sources = sources
        self.inputs_node = inputs_node

    def leaves(self, chained: dict[tuple[int, int], Any]) -> list[Any]:
        leaves = list(self.flat)
        saved = iter(self.inputs_node.saved_tensors if self.inputs_node is not None else ())
        for position, source in self.sources.items():
            leaves[position] = next(saved) if source is None else chained[source]
        return leaves


class Frame:
    """Book-keeping of one checkpointed region, alive as long as its autograd graph.

    A region is one call (``remat.checkpoint``) or several calls the model makes in turn
    (a segment of blocks: ``remat.sqrt``): each call's tensor arguments are either outputs
    of an earlier call of the frame, recomputed, or saved as the region's inputs. Backward
    recomputes the calls in the order they ran in forward, so a model that stops early or
    skips blocks is recomputed as it ran.
    """

    def __init__(self, region: str, early_stop: bool, check: str) -> None:
        self.region = region
        self.early_stop = early_stop
        self.check = check
        self.calls: list[_Call] = []
        # id of each call's tensor outputs -> (weak reference, call, leaf), to tell which
        # arguments of a later call are chained from an earlier one.
        self.outputs: dict[int, tuple[weakref.ref[Tensor], int, int]] = {}
        # (call, leaf) of each chained output -> the last call that takes it.
        self.last_use: dict[tuple[int, int], int] = {}
        self.weak_holders: list[weakref.ref[_Holder]] = []
        self.records: list[determinism.TensorRecord] = []
        # Per backward call: handle -> (recomputed tensor, its version when it was saved).
        self.recomputed: defaultdict[
            int, weakref.WeakKeyDictionary[_Handle, tuple[Tensor, int]]
        ] = defaultdict(weakref.WeakKeyDictionary)
        self.handed_in_call: list[_Handle] = []  # recomputed in the call now rerunning
        self.counter: defaultdict[int, int] = defaultdict(int)
        self.is_recomputed: defaultdict[int, bool] = defaultdict(bool)
        self.forward_completed = False
        self.ignore_count_mismatch = False
        # Whether the RNG drew since the first call began (ForwardState.draws), once seen
        # for good: a later call computes from the earlier calls' outputs.
        self.draws: RandomDraws | None = None
        self.drawn = False

    def after_draw(self) -> bool:
        """Whether what the forward saves now may hold drawn numbers (its values are then
        checked in recomputation, see :mod:`remat.engine.determinism`)."""
        if not self.drawn and self.draws is not None:
            self.drawn = self.draws.since_start()
        return self.drawn

    def chained(self, value: Any) -> tuple[int, int] | None:
        """(call, leaf) of the earlier call's output that ``value`` is, else ``None``."""
        entry = self.outputs.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1], entry[2]

    def continues(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a call on these arguments carries on this frame: it takes an output of
        one of its calls, and backward has not recomputed it yet."""
        if any(self.is_recomputed.values()):
            return False
        return any(
            isinstance(leaf, Tensor) and self.chained(leaf) is not None
            for leaf in tree_flatten((args, kwargs))[0]
        )

    def forward_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        state: ForwardState,
        region: str,
        context_fn: Callable[[], tuple[ContextManager[Any], ContextManager[Any]]] | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as the frame's next call, keeping only its inputs."""
        flat, spec = tree_flatten((args, kwargs))
        sources: dict[int, tuple[int, int] | None] = {}
        saved: list[Tensor] = []
        for position, leaf in enumerate(flat):
            if isinstance(leaf, Tensor):
                source = sources[position] = self.chained(leaf)
                if source is None:
                    saved.append(leaf)
                else:
                    self.last_use[source] = len(self.calls)
        forward_ctx, recompute_ctx = (
            context_fn() if context_fn else (contextlib.nullcontext(), contextlib.nullcontext())
        )

        def run(leaves: list[Any]) -> Any:
            r_args, r_kwargs = tree_unflatten(fresh_caches(leaves, region), spec)
            with state.replay(), recompute_ctx:
                return fn(*r_args, **r_kwargs)

        flat_inputs = snapshot_caches([None if isinstance(x, Tensor) else x for x in flat])
        self.calls.append(_Call(run, flat_inputs, sources, _save_inputs(saved)))
        # Only the region's own inputs must stay unwritten: an input chained from an
        # earlier call is recomputed, and the write with it.
        state.watch_inputs(saved)
        self.draws = state.draws
        self.forward_completed = False
        with _ForwardHooks(self), forward_ctx:
            out = fn(*args, **kwargs)
        self.forward_completed = True
        self.draws = None
        state.after_forward(region, closure_tensors(fn))
        index = len(self.calls) - 1
        for leaf_index, leaf in enumerate(tree_flatten(out)[0]):
            if isinstance(leaf, Tensor):
                self.outputs[id(leaf)] = (weakref.ref(leaf), index, leaf_index)
        return out

    def recompute(self, gid: int) -> None:
        try:
            with _RecomputeHooks(self, gid), torch.enable_grad():
                self._rerun_calls(gid)
        except _StopRecomputation:
            pass
        self.is_recomputed[gid] = True
        if not self.ignore_count_mismatch and self.counter[gid] != len(self.weak_holders):
            raise determinism.count_error(self.region, len(self.weak_holders), self.counter[gid])

    def _rerun_calls(self, gid: int) -> None:
        # Outputs a later call takes, each held only until that call has it: as in the
        # forward, the block between two others frees its input once it is done with it.
        chained: dict[tuple[int, int], Any] = {}
        for index, call in enumerate(self.calls):
            leaves = call.leaves(chained)
            for key in [k for k in chained if self.last_use[k] == index]:
                del chained[key]
            try:
                out = tree_flatten(call.run(leaves))[0]
            finally:
                self._versions_after_call(gid)
            del leaves
            for leaf_index, leaf in enumerate(out):
                if (index, leaf_index) in self.last_use:
                    chained[(index, leaf_index)] = leaf

    def _versions_after_call(self, gid: int) -> None:
        """The versions a call's recomputed tensors have once the call is done (its buffers
        put back, counters included): a later call writing one of them shows from here."""
        recomputed = self.recomputed[gid]
        for handle in self.handed_in_call:
            tensor, _ = recomputed[handle]
            recomputed[handle] = (tensor, tensor._version)
        self.handed_in_call.clear()


def _save_inputs(tensors: list[Tensor]) -> Any:
    """The no-op node that saves a call's inputs (``None`` when it has none to save)."""
    if not tensors:
        return None
    dummy = torch.empty((0,), device=tensors[0].device, requires_grad=True)
    return _SaveInputs.apply(dummy, *tensors).grad_fn


class _ForwardHooks(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, frame: Frame) -> None:
        def pack(x: Tensor) -> _Holder:
            holder = _Holder()
            frame.weak_holders.append(weakref.ref(holder))
            if frame.check != "none":
                frame.records.append(
                    determinism.record(x, frame.check, after_draw=frame.after_draw())
                )
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
            tensor, version = frame.recomputed[gid][handle]
            holder.handles[gid] = None  # free it now, even with retain_graph=True
            # A later call of the same recomputation may have written it in place (a block
            # whose in-place ReLU overwrites the output the block before saved): what
            # autograd would have raised for in the forward.
            return checked_version(tensor, version, frame.region)

        super().__init__(pack, unpack)


class _RecomputeHooks(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, target: Frame, gid: int) -> None:
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
                raise determinism.count_error(frame.region, len(frame.weak_holders), index + 1)
            holder = frame.weak_holders[index]()
            if holder is not None:  # None: already used by an earlier backward, skip it
                if frame.check != "none":
                    forward = frame.records[index]
                    again = determinism.record_again(x, forward, frame.check)
                    if not forward.same_as(again):
                        raise determinism.mismatch_error(
                            frame.region, "saved tensor", index, forward, again
                        )
                handle = _Handle()
                holder.handles[gid] = handle
                frame.recomputed[gid][handle] = (x_saved, x._version)
                frame.handed_in_call.append(handle)
            if frame.early_stop and frame.counter[gid] == len(frame.weak_holders):
                raise _StopRecomputation
            # Detached: a saved *output* packed with its grad_fn would form a reference
            # cycle node -> saved variable -> tensor -> node that is never freed. Autograd
            # re-attaches the history on unpack, so backward inside the region still works.
            return x_saved

        super().__init__(pack, lambda x: x)
