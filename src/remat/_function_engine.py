"""The ``engine="function"`` checkpoint: the tutorial's ``torch.autograd.Function``, done right.

The tutorial's Function runs the region under ``no_grad`` and in backward returns
``torch.autograd.grad(outputs, inputs, grad_outputs)``: the weights inside the region are not
inputs of the Function, so they silently get no gradient, and when no input requires grad
backward is never even called. Here the parameters of every module the region uses are
passed to the Function as extra inputs, so autograd asks for their gradients and they come
back through the Function like any other input's: ``loss.backward()``,
``torch.autograd.grad(loss, params)`` and ``backward(inputs=...)`` all see them.

A region can reach tensors that require grad through paths remat cannot see (a module in a
global variable). The forward therefore builds the region's autograd graph once, keeping no
saved tensor (so it costs no activation memory), and checks that every leaf it reaches is an
input of the Function; if not, it raises ``CheckpointError`` pointing at ``engine="hooks"``
instead of returning a wrong gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat import _determinism
from remat._replay import ForwardState, closure_tensors, describe_fn, reachable_modules
from remat.errors import CheckpointError


@dataclass(slots=True)
class _Call:
    """One checkpointed call: what forward captured and backward needs."""

    fn: Callable[..., Any]
    spec: Any
    flat_inputs: list[Any]
    tensor_positions: list[int]
    region: str
    determinism_check: str
    state: ForwardState | None = None
    out_spec: Any = None
    out_leaves: list[Any] = field(default_factory=list)
    out_positions: list[int] = field(default_factory=list)
    out_records: list[_determinism.TensorRecord] = field(default_factory=list)
    saved_records: list[_determinism.TensorRecord] = field(default_factory=list)

    def record_saved(self, x: Tensor) -> None:
        """Probe-pass pack hook: note what autograd would save, keep nothing."""
        if self.determinism_check != "none":
            self.saved_records.append(_determinism.record(x, self.determinism_check))

    @contextlib.contextmanager
    def checking_saved(self) -> Iterator[None]:
        """Compare each tensor the recomputation saves with the probe pass's, in order."""
        if self.determinism_check == "none":
            yield
            return
        count = 0

        def pack(x: Tensor) -> Tensor:
            nonlocal count
            if count < len(self.saved_records):
                forward = self.saved_records[count]
                again = _determinism.record(x, self.determinism_check)
                if not forward.same_as(again):
                    raise _determinism.mismatch_error(
                        self.region, "saved tensor", count, forward, again
                    )
            count += 1
            # Detached, or a saved output would hold its own node alive (a leaked cycle).
            return x.detach() if x.requires_grad else x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield
        if count != len(self.saved_records):
            raise _determinism.count_error(self.region, len(self.saved_records), count)

    def call(self, tensors: Sequence[Tensor]) -> Any:
        leaves = list(self.flat_inputs)
        for position, tensor in zip(self.tensor_positions, tensors):
            leaves[position] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)


def _never_unpacked(_: Any) -> Tensor:  # pragma: no cover - the probe graph is never run
    raise CheckpointError("remat internal error: the function engine's probe graph was used")


def _check_reaches_only(
    outputs: Sequence[Tensor], known: Sequence[Tensor], start: int, region: str
) -> None:
    """Raise if the graph behind ``outputs`` reaches a tensor that is not a known input.

    Nodes created before this forward (sequence number below ``start``) belong to tensors
    from outside the region; leaves are reached through AccumulateGrad nodes.
    """
    known_ids = {id(t) for t in known}
    known_nodes = {t.grad_fn._sequence_nr() for t in known if t.grad_fn is not None}
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            if id(variable) not in known_ids:
                raise _invisible_tensor_error(region, variable)
            continue
        if node._sequence_nr() < start:
            if node._sequence_nr() in known_nodes:
                continue
            raise _invisible_tensor_error(region, None)
        stack.extend(next_node for next_node, _ in node.next_functions)


def _invisible_tensor_error(region: str, leaf: Tensor | None) -> CheckpointError:
    what = (
        f"a tensor of shape {list(leaf.shape)} that requires grad"
        if leaf is not None
        else "a tensor computed outside it that requires grad"
    )
    return CheckpointError(
        f'remat.checkpoint(engine="function"): {region} uses {what} which is neither an '
        "argument nor a parameter of a module passed to it (e.g. a module held in a global "
        "variable). This engine can only return gradients for its own inputs and would "
        'silently drop that gradient. Pass the module or tensor in, or use engine="hooks".'
    )


class CheckpointFunction(torch.autograd.Function):
    """Checkpoint as a ``torch.autograd.Function``, called like the tutorial's:

    ``CheckpointFunction.apply(fn, *args, **kwargs)``. Unlike the tutorial's, the parameters
    of the modules ``fn`` uses get gradients, also when no input requires grad, and pytrees of
    inputs and outputs (lists, dicts, non-tensor leaves) work.

    Example:
        >>> block = torch.nn.Linear(4, 4)
        >>> y = CheckpointFunction.apply(block, torch.randn(2, 4))
        >>> y.sum().backward()  # block.weight.grad is set
    """

    @classmethod
    def apply(cls, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if not callable(fn):
            raise TypeError(
                f"CheckpointFunction.apply: fn must be callable, got {type(fn).__name__}"
            )
        return checkpoint_function(
            fn, args, kwargs, preserve_rng_state=True, determinism_check="metadata"
        )

    @staticmethod
    def forward(ctx: Any, call: _Call, n_inputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        inputs, extra = tensors[:n_inputs], tensors[n_inputs:]
        # Aliases that are leaves, so that the probe graph stops at the region's boundary.
        aliases = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad():
            start = torch.empty((0,), requires_grad=True).mul(1).grad_fn._sequence_nr()
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(call.record_saved, _never_unpacked),
        ):
            out = call.call(aliases)
        leaves, call.out_spec = tree_flatten(out)
        call.out_positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        outs = [leaves[i] for i in call.out_positions]
        _check_reaches_only(
            [o for o in outs if o.requires_grad], [*aliases, *extra], start, call.region
        )
        if call.determinism_check != "none":
            call.out_records = [_determinism.record(o, call.determinism_check) for o in outs]
        call.out_leaves = [None if isinstance(x, Tensor) else x for x in leaves]
        detached = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*(d for d, o in zip(detached, outs) if not o.requires_grad))
        ctx.call = call
        ctx.n_inputs = n_inputs
        ctx.save_for_backward(*tensors)
        return detached

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        inputs, extra = saved[: ctx.n_inputs], saved[ctx.n_inputs :]
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            # Fresh leaves: the recomputed graph ends here and is freed after this call.
            inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        state: ForwardState = call.state  # type: ignore[assignment]
        # Gradients are taken inside the replay, before buffers get their values back, so
        # that a buffer the region saved is still at the version autograd recorded.
        with torch.enable_grad(), state.replay():
            with call.checking_saved():
                out = call.call(inputs)
            leaves, _ = tree_flatten(out)
            outs = [leaves[i] for i in call.out_positions if i < len(leaves)]
            _check_outputs(call, outs)
            needs = ctx.needs_input_grad[2:]
            wanted = [t for t, need in zip((*inputs, *extra), needs) if need]
            pairs = [
                (o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad
            ]
            if not wanted or not pairs:
                return (None, None, *(None for _ in needs))
            grads = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs],
                    wanted,
                    [g for _, g in pairs],
                    allow_unused=True,
                    create_graph=create_graph,
                )
            )
        return (None, None, *(next(grads) if need else None for need in needs))


def _check_outputs(call: _Call, outs: Sequence[Tensor]) -> None:
    if call.determinism_check == "none":
        return
    if len(outs) != len(call.out_records):
        raise _determinism.count_error(call.region, len(call.out_records), len(outs))
    for position, (forward, tensor) in enumerate(zip(call.out_records, outs)):
        again = _determinism.record(tensor, call.determinism_check)
        if not forward.same_as(again):
            raise _determinism.mismatch_error(call.region, "output", position, forward, again)


def _parameters(modules: Sequence[nn.Module]) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def checkpoint_function(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    preserve_rng_state: bool,
    determinism_check: str,
) -> Any:
    """Run ``fn(*args, **kwargs)`` through :class:`CheckpointFunction`."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, x in enumerate(flat) if isinstance(x, Tensor)]
    tensors = [flat[i] for i in positions]
    modules = reachable_modules(fn, flat)
    extra = [*_parameters(modules), *closure_tensors(fn)]
    call = _Call(
        fn=fn,
        spec=spec,
        flat_inputs=[None if isinstance(x, Tensor) else x for x in flat],
        tensor_positions=positions,
        region=describe_fn(fn),
        determinism_check=determinism_check,
    )
    call.state = ForwardState.capture(tensors, modules, preserve_rng_state=preserve_rng_state)
    outs = super(CheckpointFunction, CheckpointFunction).apply(  # type: ignore[misc]
        call, len(tensors), *tensors, *extra
    )
    call.state.buffers.keep_mutated()
    leaves = list(call.out_leaves)
    for position, tensor in zip(call.out_positions, outs):
        leaves[position] = tensor
    return tree_unflatten(leaves, call.out_spec)
