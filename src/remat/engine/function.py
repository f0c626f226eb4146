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

from remat.engine import determinism
from remat.engine.caches import fresh_caches, snapshot_caches
from remat.engine.region_modules import closure_tensors, describe_fn, reachable_modules
from remat.engine.replay import ForwardState
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
    out_records: list[determinism.TensorRecord] = field(default_factory=list)
    saved_records: list[determinism.TensorRecord] = field(default_factory=list)
    args_kwargs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})  # forward only
    modules: Sequence[nn.Module] = ()
    parameters: Sequence[Tensor] = ()  # the Function's extra inputs, as the modules hold them

    def record_saved(self, x: Tensor) -> None:
        """Probe-pass pack hook: note what autograd would save, keep nothing."""
        if self.determinism_check != "none":
            draws = self.state.draws if self.state is not None else None
            after_draw = draws is not None and draws.since_start()
            self.saved_records.append(
                determinism.record(x, self.determinism_check, after_draw=after_draw)
            )

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
                again = determinism.record_again(x, forward, self.determinism_check)
                if not forward.same_as(again):
                    raise determinism.mismatch_error(
                        self.region, "saved tensor", count, forward, again
                    )
            count += 1
            # Detached, or a saved output would hold its own node alive (a leaked cycle).
            return x.detach() if x.requires_grad else x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield
        if count != len(self.saved_records):
            raise determinism.count_error(self.region, len(self.saved_records), count)

    def call(self, tensors: Sequence[Tensor]) -> Any:
        """Recomputation: ``fn`` on ``tensors``, with copies of the containers it was given
        (a list it appends to in forward is not appended to twice)."""
        leaves = fresh_caches(self.flat_inputs, self.region)
        for position, tensor in zip(self.tensor_positions, tensors):
            leaves[position] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)

    def call_forward(self, tensors: Sequence[Tensor]) -> Any:
        """Forward: ``fn`` on the caller's own arguments, tensors swapped for ``tensors``.

        Containers without tensors are passed as they are, so what ``fn`` puts in them (a
        log it appends to) reaches the caller. A container holding tensors has to be a copy
        (its tensors are swapped); ``fn`` changing that copy raises.
        """
        swapped = dict(zip(self.tensor_positions, tensors))
        position = 0

        def swap(value: Any) -> Any:
            nonlocal position
            leaves, spec = tree_flatten(value)
            if not any(isinstance(leaf, Tensor) for leaf in leaves):
                position += len(leaves)
                return value
            new = [swapped.get(position + i, leaf) for i, leaf in enumerate(leaves)]
            position += len(leaves)
            return tree_unflatten(new, spec)

        args, kwargs = self.args_kwargs
        new_args = tuple(swap(a) for a in args)
        new_kwargs = {k: swap(v) for k, v in kwargs.items()}
        copies = [
            (name, copy, tree_flatten(copy)[0])
            for name, original, copy in (
                *((f"argument #{i}", a, b) for i, (a, b) in enumerate(zip(args, new_args))),
                *((f"argument {k!r}", kwargs[k], new_kwargs[k]) for k in kwargs),
            )
            if copy is not original and isinstance(copy, (list, dict))
        ]
        out = self.fn(*new_args, **new_kwargs)
        for name, copy, leaves in copies:
            now = tree_flatten(copy)[0]
            if len(now) != len(leaves) or any(a is not b for a, b in zip(now, leaves)):
                raise CheckpointError(
                    f'remat.checkpoint(engine="function"): {self.region} changed its {name}, a '
                    "container holding tensors. This engine passes such containers as copies "
                    "(their tensors become the Function's inputs), so the change would not "
                    'reach the caller. Use engine="hooks", which passes them as they are.'
                )
        return out


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
            out = call.call_forward(aliases)
        call.args_kwargs = ((), {})
        leaves, call.out_spec = tree_flatten(out)
        call.out_positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        outs = [leaves[i] for i in call.out_positions]
        _check_reaches_only(
            [o for o in outs if o.requires_grad], [*aliases, *extra], start, call.region
        )
        if call.determinism_check != "none":
            call.out_records = [determinism.record(o, call.determinism_check) for o in outs]
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
        create_graph = torch.is_grad_enabled()
        # The recomputation runs on aliases of the inputs and parameters, and gradients are
        # taken with respect to the aliases: taken with respect to the tensors themselves,
        # their hooks (``w.register_hook``) would run here and again when the gradients
        # reach them through this Function. Fresh leaves end the recomputed graph here;
        # with create_graph, views keep it connected for double backward.
        aliases = [_alias(t, create_graph) for t in saved]
        inputs, extra = aliases[: ctx.n_inputs], aliases[ctx.n_inputs :]
        state: ForwardState = call.state  # type: ignore[assignment]
        # Gradients are taken inside the replay, before buffers get their values back, so
        # that a buffer the region saved is still at the version autograd recorded.
        with (
            torch.enable_grad(),
            state.replay(),
            _parameters_swapped(call, extra),
        ):
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


def _alias(t: Tensor, create_graph: bool) -> Tensor:
    if not t.requires_grad:
        return t
    return t.view_as(t) if create_graph else t.detach().requires_grad_(True)


@contextlib.contextmanager
def _parameters_swapped(call: _Call, aliases: Sequence[Tensor]) -> Iterator[None]:
    """Register ``aliases`` in place of the region's parameters in its modules (and in its
    function's closure) while the body runs."""
    alias_of = {id(p): a for p, a in zip(call.parameters, aliases) if a is not p}
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    for root in call.modules:
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in alias_of:
                    swapped.append((module._parameters, name, p))
    func = getattr(call.fn, "__func__", call.fn)
    cells = [
        cell
        for cell in getattr(func, "__closure__", None) or ()
        if id(_cell_contents(cell)) in alias_of
    ]
    originals = [cell.cell_contents for cell in cells]
    try:
        for table, name, p in swapped:
            table[name] = alias_of[id(p)]
        for cell in cells:
            cell.cell_contents = alias_of[id(cell.cell_contents)]
        yield
    finally:
        for table, name, p in swapped:
            table[name] = p
        for cell, original in zip(cells, originals):
            cell.cell_contents = original


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _check_outputs(call: _Call, outs: Sequence[Tensor]) -> None:
    if call.determinism_check == "none":
        return
    if len(outs) != len(call.out_records):
        raise determinism.count_error(call.region, len(call.out_records), len(outs))
    for position, (forward, tensor) in enumerate(zip(call.out_records, outs)):
        again = determinism.record(tensor, call.determinism_check)
        if not forward.same_as(again):
            raise determinism.mismatch_error(call.region, "output", position, forward, again)


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
        flat_inputs=snapshot_caches([None if isinstance(x, Tensor) else x for x in flat]),
        tensor_positions=positions,
        region=describe_fn(fn),
        determinism_check=determinism_check,
        args_kwargs=(args, kwargs),
        modules=modules,
        parameters=extra,
    )
    call.state = ForwardState.capture(tensors, modules, preserve_rng_state=preserve_rng_state)
    outs = super(CheckpointFunction, CheckpointFunction).apply(  # type: ignore[misc]
        call, len(tensors), *tensors, *extra
    )
    call.state.after_forward(call.region, closure_tensors(fn))
    leaves = list(call.out_leaves)
    for position, tensor in zip(call.out_positions, outs):
        leaves[position] = tensor
    return tree_unflatten(leaves, call.out_spec)
