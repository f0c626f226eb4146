"""Profile a model for the planner: per region (and per op inside it) cost and bytes.

``remat.profile(model, *inputs)`` runs the model a few times on the device it is on:

1. one training step in which every candidate region records, in bytes, its input, its output
   and what autograd saves while it runs (unique storages; parameters and buffers excluded),
   and in which a dispatch mode lists every op of each region with its output bytes;
2. timed forward passes (median per region and per op) on CPU and CUDA; on the meta device,
   where nothing can be timed, the cost is FLOPs (``FlopCounterMode``) plus output bytes as a
   stand-in for the memory traffic of pointwise ops;
3. the un-checkpointed training step under :class:`remat.MemoryTracker`, whose peak calibrates
   what the chain model does not see (embedding, head, loss, gradients being produced).

Candidate regions are, by default, the children of the model's repeated-block lists (the
``blocks`` of a GPT, the ``layers`` of a Llama); a model without such a list is a chain of
its direct children.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from remat.engine.tape import writes_to_arguments
from remat.errors import PlanError
from remat.measure.storage import iter_tensors, unique_storage_bytes
from remat.measure.tracker import MemoryTracker
from remat.measure.training_call import (
    check_loss_fn,
    default_loss,
    require_train_mode,
    training_call,
)
from remat.policy.treatments import block_lists, draws_random_numbers

__all__ = ["OpProfile", "Profile", "RegionProfile", "default_regions", "profile"]


@dataclass(frozen=True, kw_only=True, slots=True)
class OpProfile:
    """One op inside a region: ``name`` is ``"<overload>#<k>"``, its k-th call in the region;
    ``output_saved``: autograd saves its output for backward (see ``planner.Op``);
    ``saveable``: a selective checkpoint may keep its output (not a random op, an in-place
    op or an output that an in-place op changes later); ``recomputable``: its outputs
    follow from its arguments alone (not a random op nor one that writes to an argument,
    such as batch norm's running statistics), which the tape engine needs."""

    name: str
    output_bytes: int
    cost: float
    output_saved: bool = True
    saveable: bool = True
    recomputable: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionProfile:
    """What the planner needs to know about one region (bytes are unique storages).

    Attributes:
        name: the module's qualified name.
        type: its class name.
        cost: forward cost (seconds, or FLOPs + bytes on meta; see ``Profile.cost_unit``).
        flops: forward FLOPs.
        input_bytes: its tensor inputs (kept when it is checkpointed).
        saved_bytes: what autograd keeps for its backward when it runs normally, its input
            included when something saves it (``input_saved``).
        output_bytes: its output.
        transient_bytes: the most it allocates beyond its saved activations and output while
            it runs forward or backward on its own (gradients in flight, workspaces), with
            the parameter gradients live during its backward.
        ops: its ops, in call order.
        input_saved: whether its input is saved for backward (see ``planner.Region``).
        forward_transient_bytes: the part of ``transient_bytes`` reached in its forward.
        recompute_ops: how many of ``ops`` a recomputation runs: those before the last
            tensor autograd saves in the region (``None``: all). A Linear's input is saved
            before it runs, so a block ending in a Linear and a residual add stops before
            both (the early stop of remat's checkpoint).
        op_overhead: what op-level checkpointing costs the region beyond the ops it
            recomputes, measured with every op saved on the engine its plans use (see
            ``Profile.op_engines``; 0 on meta): the replay engine's dispatch modes see
            every op in the forward and again in the recomputation, which also reruns the
            Python forward; the tape engine records every op in the forward.
        store_only: why the region cannot be recomputed from its input (``""``: it can):
            ``"writes its input in place"`` for an ``nn.ReLU(inplace=True)`` region, whose
            recomputation would start from the written input (``planner.Region``). Its
            op-level options run on the tape, which copies what it holds before a write.
    """

    name: str
    type: str
    cost: float
    flops: int
    input_bytes: int
    saved_bytes: int
    output_bytes: int
    transient_bytes: int = 0
    ops: tuple[OpProfile, ...] = ()
    input_saved: bool = True
    forward_transient_bytes: int | None = None
    recompute_ops: int | None = None
    op_overhead: float = 0.0
    store_only: str = ""

    @property
    def rerun_ops(self) -> tuple[OpProfile, ...]:
        """The ops a recomputation of the region runs."""
        return self.ops if self.recompute_ops is None else self.ops[: self.recompute_ops]

    def to_region(self) -> Any:
        """The planner's ``Region`` (no op-level options)."""
        from remat.planner import Region

        rerun = None
        if self.recompute_ops is not None and self.ops:
            rerun = min(self.cost, sum(o.cost for o in self.rerun_ops))

        return Region(
            name=self.name,
            fwd_cost=self.cost,
            input_bytes=self.input_bytes,
            saved_bytes=self.saved_bytes,
            output_bytes=self.output_bytes,
            transient_bytes=self.transient_bytes,
            input_saved=self.input_saved,
            forward_transient_bytes=self.forward_transient_bytes,
            recompute_cost=rerun,
            store_only=self.store_only,
        )


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Per-region profile of one training step of a model.

    Attributes:
        regions: the candidate regions, in the order the forward runs them.
        cost_unit: ``"seconds"`` or ``"flops+bytes"`` (meta device).
        device: where it was measured.
        step_peak_bytes: the un-checkpointed training step's peak, new bytes only
            (parameters and inputs excluded): what budgets in percent refer to.
        outside_bytes: the part of that peak the chain model does not explain; planning
            subtracts it from the budget.
        forward_cost: the whole model's forward cost, for relative overheads.
        tail_bytes: what the model adds after the chain (head, loss and their backward) on
            top of what the chain holds then, measured between the last region's forward
            and its backward (``planner.Chain.tail_bytes``).
        op_engines: the engines its op-level options run on (``remat.profile``'s
            ``op_engines``: ``"auto"`` or ``"replay"``).
    """

    regions: tuple[RegionProfile, ...]
    cost_unit: str
    device: str
    step_peak_bytes: int
    outside_bytes: int
    forward_cost: float
    tail_bytes: int = 0
    op_engines: str = "auto"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_chain(self, *, op_options: bool = True, max_options: int = 8) -> Any:
        """The planner's problem for these regions (op-level menus when ``op_options``)."""
        from remat.planner import Chain, Op, with_ops

        regions = []
        for r in self.regions:
            region = r.to_region()
            ops = [
                Op(name=o.name, output_bytes=o.output_bytes, recompute_cost=o.cost,
                   output_saved=o.output_saved)
                for o in r.rerun_ops if o.output_bytes > 0 and o.saveable
            ]  # fmt: skip
            if op_options and ops:
                overhead = r.op_overhead
                region = with_ops(region, ops, max_options=max_options, overhead=overhead)
                region = _with_preset_options(region, ops, overhead)
                # A region that writes its input runs op-level on the tape only: the
                # replay reruns it from the written input.
                engine = "tape" if r.store_only else op_engine(r.ops, self.op_engines)
                region = _on_engine(region, engine)
            regions.append(region)
        return Chain(regions, tail_bytes=self.tail_bytes)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        regions = tuple(
            RegionProfile(**{**r, "ops": tuple(OpProfile(**o) for o in r["ops"])})
            for r in data.pop("regions")
        )
        return cls(regions=regions, **data)


OP_ENGINE_CHOICES = ("auto", "replay")


def op_engine(ops: Sequence[Any], choice: str = "auto") -> str:
    """The op-level engine a region's plans use. ``"auto"``: ``"tape"`` (no replay, less
    fixed cost) when every op of the region may be recomputed from its arguments,
    ``"replay"`` when it has a random or in-place op, whose outputs the tape would keep
    beyond the menu's bytes. ``"replay"``: always the replay."""
    if choice == "auto" and ops and all(o.saveable and o.recomputable for o in ops):
        return "tape"
    return "replay"


def _on_engine(region: Any, engine: str) -> Any:
    return replace(region, options=tuple(replace(o, engine=engine) for o in region.options))


def _with_preset_options(region: Any, ops: Sequence[Any], overhead: float = 0.0) -> Any:
    """Add the named op presets (``"save-matmuls"``...) to a region's menu.

    The knapsack menu is thinned to a few options spread over memory, which can drop the
    well-known good ones (keep every matmul, recompute the pointwise ops); they are added
    back by name, unless an option of the menu keeps no more bytes for no more cost.
    """
    from remat.planner.op_menu import saving_option
    from remat.policy.treatments import OP_PRESETS

    options = list(region.options)
    total = float(sum(float(o.recompute_cost) for o in ops))
    for preset, names in OP_PRESETS.items():
        saved = [o for o in ops if o.name.split("#")[0].split(".")[1] in names]
        if not saved:
            continue
        new = saving_option(
            preset, saved, input_bytes=region.input_bytes, total_cost=total, overhead=overhead
        )
        kept, cost = new.kept_bytes, new.recompute_cost
        inside = (
            region.input_bytes <= kept < region.saved_with_input_bytes
            and 0 < cost < region.rerun_cost
        )
        dominated = any(o.kept_bytes <= kept and o.recompute_cost <= cost for o in options)
        if inside and not dominated:
            options.append(new)
    return replace(region, options=tuple(options))


def default_regions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of the repeated-block lists, else the model's direct children with every
    ``nn.Sequential`` among them opened up into its own children (recursively): a
    Sequential is a chain already, and its layers are regions the planner can tell apart
    (three big blocks leave it little to choose from)."""
    lists = block_lists(model)
    if lists:
        return [
            (f"{fqn}.{name}" if fqn else name, child)
            for fqn, blocks in lists
            for name, child in blocks.named_children()
        ]
    return _opened(model, "")


def _opened(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        if isinstance(child, nn.Sequential) and len(child):
            out += _opened(child, f"{fqn}.")
        else:
            out.append((fqn, child))
    return out


def _storage_bytes(tree: Any, exclude: set[int]) -> tuple[set[int], int]:
    keys: dict[int, int] = {}
    for t in tree_leaves(tree):
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            if st._cdata not in exclude:
                keys[st._cdata] = st.nbytes()
    return set(keys), sum(keys.values())


@dataclass(slots=True)
class _OpRecord:
    """One op call as the recorder sees it (mutable: later ops and saves update it)."""

    name: str
    output_bytes: int
    seconds: float
    output_saved: bool = False  # the region's own autograd nodes save its output
    saveable: bool = True  # a selective checkpoint may cache its output (see _OpRecorder)
    recomputable: bool = True  # its outputs follow from its arguments (see OpProfile)


class _OpRecorder(TorchDispatchMode):
    """Lists the ops each region runs, with their new output bytes, duration, whether the
    region's own autograd nodes save their output (``mark_saved``), and whether a selective
    checkpoint may cache it: not for random ops (skipping one in the recomputation would
    shift the random numbers of the ops after it) nor for in-place ops and the outputs they
    modify (the cache would hand back a changed tensor)."""

    def __init__(self, current: Callable[[], str | None], timed: bool, sync: Callable[[], None]):
        super().__init__()
        self.current, self.timed, self.sync = current, timed, sync
        self.ops: dict[str, list[_OpRecord]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        # storage key -> (region, op record) of the op whose output lives there now. A key
        # is a storage's address, reused once the storage is freed: only the live storage's
        # producer may be looked up, which is what a save sees.
        self.producer: dict[int, tuple[str, _OpRecord]] = {}

    def mark_saved(self, key: int, region: str) -> None:
        """``region`` saves the live storage ``key`` for backward."""
        found = self.producer.get(key)
        if found is not None and found[0] == region:
            found[1].output_saved = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        region = self.current()
        start = time.perf_counter() if self.timed and region else 0.0
        out = func(*args, **(kwargs or {}))
        if region is None:
            return out
        if self.timed:
            self.sync()
        elapsed = time.perf_counter() - start
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor)}  # fmt: skip
        keys, nbytes = _storage_bytes(out, inputs)
        counts = self.counts.setdefault(region, {})
        k = counts.get(str(func), 0)
        counts[str(func)] = k + 1
        mutates = func._schema.is_mutable
        if mutates:  # whatever it may write to must not come from the cache either
            for key in inputs:
                if key in self.producer:
                    self.producer[key][1].saveable = False
        random = draws_random_numbers(func, args, kwargs or {})
        record = _OpRecord(
            f"{func}#{k}",
            nbytes,
            elapsed,
            saveable=not (mutates or random),
            recomputable=not (random or writes_to_arguments(func)),
        )
        self.ops.setdefault(region, []).append(record)
        self.producer.update(dict.fromkeys(keys, (region, record)))
        return out


def profile(
    model: nn.Module,
    *inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    regions: Sequence[str] | None = None,
    repeats: int = 3,
    op_engines: str = "auto",
    **kwargs: Any,
) -> Profile:
    """Profile ``model`` on ``inputs`` for :func:`remat.plan`.

    Args:
        model: the model, on the device to profile (``cpu``, ``cuda`` or ``meta``).
        *inputs: its positional inputs.
        loss_fn: output -> scalar loss; default ``output.float().sum()`` (first tensor leaf).
        regions: qualified names of the candidate regions, in forward order; default
            :func:`default_regions`.
        repeats: timed forward passes (median).
        op_engines: which engines op-level plans use (``remat.Ops.engine``): ``"auto"``
            (the tape where every op of a region can be recomputed from its arguments, the
            replay where a random or in-place op cannot) or ``"replay"`` (everywhere: the
            choice for regions whose parameters are freed between forward and backward
            outside autograd's view). Op-level overheads are measured on these engines.
        **kwargs: keyword inputs of the model.

    Returns:
        A :class:`Profile`.

    Profiling runs the model several times; its buffers (BatchNorm statistics), its
    parameters' gradients and the RNG state are put back as they were.

    Raises:
        TypeError: ``model`` is not a module; ``repeats``, ``loss_fn`` or ``regions`` has a
            wrong type.
        ValueError: ``repeats`` below 1, ``op_engines`` not ``"auto"`` or ``"replay"``.
        PlanError: a region name does not exist or a region never ran, or the model is in
            eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.profile: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int):
        raise TypeError(f"remat.profile: repeats must be an int, got {repeats!r}")
    if repeats < 1:
        # With none, every region's cost would be 0 and the planner would plan blind.
        raise ValueError(f"remat.profile: repeats must be at least 1, got {repeats}")
    check_loss_fn(loss_fn, "remat.profile")
    if regions is not None and (
        isinstance(regions, str) or not all(isinstance(r, str) for r in regions)
    ):
        raise TypeError(f"remat.profile: regions must be a list of module names, got {regions!r}")
    if op_engines not in OP_ENGINE_CHOICES:
        raise ValueError(
            f"remat.profile: op_engines={op_engines!r} is not one of {', '.join(OP_ENGINE_CHOICES)}"
        )
    require_train_mode(model, "remat.profile")
    with _state_kept(model), training_call(model):
        return _profile(model, inputs, kwargs, loss_fn, regions, repeats, op_engines)


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Put the model's buffers, its parameters' gradients and the RNG state back on exit.
    Gradients start at ``None`` meanwhile: a step's new bytes include its gradients."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    tensors = (*model.parameters(), *model.buffers())
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g


def _profile(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_fn: Callable[[Any], Tensor] | None,
    regions: Sequence[str] | None,
    repeats: int,
    op_engines: str = "auto",
) -> Profile:
    named = dict(model.named_modules())
    if regions is None:
        chosen = default_regions(model)
    else:
        missing = [r for r in regions if r not in named]
        if missing:
            raise PlanError(f"remat.profile: no module named {missing} in {type(model).__name__}")
        chosen = [(r, named[r]) for r in regions]
    if not chosen:
        raise PlanError(f"remat.profile: {type(model).__name__} has no candidate regions")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on_meta = device.type == "meta"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Parameters, buffers and the model's inputs exist before the step: not new bytes, so a
    # region whose input is the data batch keeps nothing new when checkpointed.
    existing = (*model.parameters(), *model.buffers(), *tree_leaves((inputs, kwargs)))
    exclude = {t.untyped_storage()._cdata for t in existing if isinstance(t, Tensor)}
    loss_of = loss_fn or default_loss

    stack: list[str] = []
    records: dict[str, dict[str, Any]] = {name: {"saved": {}, "times": []} for name, _ in chosen}
    handles = []
    for name, module in chosen:
        handles.append(
            module.register_forward_pre_hook(
                _pre(name, stack, records, exclude, sync), with_kwargs=True
            )
        )
        handles.append(
            module.register_forward_hook(
                _post(name, stack, records, exclude, sync), always_call=True
            )
        )

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if stack:  # a recomputation stops at the region's last save, parameters included
            records[stack[-1]]["rerun_ops"] = len(recorder.ops.get(stack[-1], ()))
        if stack and st._cdata not in exclude:
            records[stack[-1]]["saved"][st._cdata] = st.nbytes()
            recorder.mark_saved(st._cdata, stack[-1])
        return t

    try:
        recorder = _OpRecorder(lambda: stack[-1] if stack else None, not on_meta, sync)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
            loss = loss_of(model(*inputs, **kwargs))
        grad_order = _GradientOrder()
        handles += grad_order.watch(model, records[chosen[0][0]].get("call"))
        loss.backward()
        model.zero_grad(set_to_none=True)
        for rec in records.values():
            rec["times"].clear()
        for _ in range(0 if on_meta else repeats):
            with torch.no_grad():
                model(*inputs, **kwargs)
        flops = _region_flops(model, chosen, inputs, kwargs)
        overheads = (
            {}
            if on_meta
            else _op_overheads(chosen, records, recorder.ops, sync, repeats, op_engines)
        )
    finally:
        for h in handles:
            h.remove()
    step_peak, tail_peak = _measure_step(model, inputs, loss_of, kwargs, last=chosen[-1][1])

    for name, _ in chosen:
        if "input" not in records[name]:
            raise PlanError(f"remat.profile: region {name!r} did not run in the forward pass")
    handed = _handed_on([records[name] for name, _ in chosen])
    profiles = []
    for i, (name, module) in enumerate(chosen):
        rec = records[name]
        received = set().union(*handed[:i]) & rec["input"][0]
        saved_bytes, input_saved = _union(rec, handed[i], received)
        # the producer still needs what it hands on in its own backward, after the
        # consumer's backward has released it
        moved = sum(rec["saved"][k] for k in handed[i])
        forward_transient, transient = _transient_bytes(module, *rec["call"])
        ops = recorder.ops.get(name, [])
        if on_meta:
            cost = float(flops.get(name, 0) + sum(o.output_bytes for o in ops))
            op_costs = [float(o.output_bytes) for o in ops]  # FLOPs per op are not broken out
        else:
            cost = statistics.median(rec["times"]) if rec["times"] else 0.0
            total = sum(o.seconds for o in ops) or 1.0
            op_costs = [cost * o.seconds / total for o in ops]  # scaled to the timed forward
        profiles.append(
            RegionProfile(
                name=name,
                type=type(module).__name__,
                cost=cost,
                flops=int(flops.get(name, 0)),
                input_bytes=rec["input"][1],
                saved_bytes=saved_bytes,
                input_saved=input_saved,
                output_bytes=rec["output"][1],
                transient_bytes=transient + moved,
                forward_transient_bytes=forward_transient,
                recompute_ops=rec.get("rerun_ops", 0),
                op_overhead=overheads.get(name, 0.0),
                store_only="writes its input in place" if rec.get("writes_input") else "",
                ops=tuple(
                    OpProfile(
                        name=o.name,
                        output_bytes=o.output_bytes,
                        cost=c,
                        output_saved=not o.output_bytes or o.output_saved,
                        saveable=o.saveable,
                        recomputable=o.recomputable,
                    )
                    for o, c in zip(ops, op_costs)
                ),
            )
        )
    profiles = _with_gradient_bytes(model, chosen, profiles, grad_order.after_the_chain())
    # The tail sits on top of everything the chain keeps (store-all: every saved byte).
    tail = max(0, tail_peak - sum(p.saved_bytes for p in profiles))
    chain_peak = _store_all_peak(profiles, tail)
    return Profile(
        regions=tuple(profiles),
        tail_bytes=tail,
        cost_unit="flops+bytes" if on_meta else "seconds",
        device=str(device),
        step_peak_bytes=step_peak,
        outside_bytes=max(0, step_peak - chain_peak),
        forward_cost=sum(p.cost for p in profiles),
        op_engines=op_engines,
        # The default discovery can be repeated on a model a plan is applied to, to tell a
        # plan made for another model (fewer blocks) from one for this model.
        meta={"model": type(model).__name__, "default_regions": regions is None},
    )


_WARM_UP_PAIRS = 3
# The tape's overhead is about 1 ms in a GPT block step of 65 ms that varies by 2-3 ms;
# with 6 pairs, two profiles read it as 0.7 and 1.3 ms.
_MEASURED_PAIRS = 15


def _op_overheads(
    chosen: Sequence[tuple[str, nn.Module]],
    records: dict[str, dict[str, Any]],
    ops: dict[str, list[_OpRecord]],
    sync: Callable[[], None],
    repeats: int,
    op_engines: str = "auto",
) -> dict[str, float]:
    """Per region, what op-level checkpointing adds to a training step beyond recomputing
    ops: the region run with every cacheable op's output saved on the engine its plans use
    (so little is recomputed; the replay engine dispatches the ops twice and replays the
    Python forward, the tape records every op) against the region run
    plainly, forward and backward, as the median difference of alternating runs after a few
    warm-up pairs (it is a few percent of the region's step: a difference of minima was too
    noisy, and a fresh process pays more in its first runs). Regions of one type running the
    same ops are measured once."""
    from remat.policy.treatments import Ops

    measured: dict[tuple[Any, ...], float] = {}
    out = {}
    for name, module in chosen:
        region_ops = ops.get(name, ())
        key = (type(module), tuple(o.name for o in region_ops))
        writes_input = records[name].get("writes_input", False)
        key = (*key, writes_input)
        if region_ops and key not in measured:
            treatment = Ops(
                save_calls=frozenset(o.name for o in region_ops if o.saveable),
                engine="tape" if writes_input else op_engine(region_ops, op_engines),
            )
            call = records[name]["call"]
            differences = []
            with _own_gradients(module):
                for i in range(_WARM_UP_PAIRS + max(_MEASURED_PAIRS, 2 * repeats)):
                    plain = _step_seconds(module, *call, None, sync)
                    op_level = _step_seconds(module, *call, treatment, sync)
                    if i >= _WARM_UP_PAIRS:
                        differences.append(op_level - plain)
            measured[key] = max(0.0, statistics.median(differences))
        out[name] = measured.get(key, 0.0)
    return out


def _step_seconds(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    treatment: Any,
    sync: Callable[[], None],
) -> float:
    """One forward and backward pass of ``module`` alone (under ``treatment`` if given);
    the parameters' gradients are dropped afterwards."""
    a, k = _fresh_inputs(args, kwargs)
    sync()
    start = time.perf_counter()
    out = module(*a, **k) if treatment is None else treatment.run(module, a, k)
    outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    sync()
    seconds = time.perf_counter() - start
    for p in module.parameters():
        p.grad = None
    return seconds


def measure_step_peak(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    **kwargs: Any,
) -> int:
    """New bytes at the peak of one training step (parameters and inputs excluded).

    Gradients are cleared first: they are allocated by the step, so they count.
    """
    return _measure_step(model, inputs, loss_fn, kwargs)[0]


def _measure_step(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    kwargs: dict[str, Any],
    last: nn.Module | None = None,
) -> tuple[int, int]:
    """(the step's peak, the peak from the end of ``last``'s forward until its output's
    gradient is ready: what the rest of the model adds on top), new bytes."""
    model.zero_grad(set_to_none=True)
    window: dict[str, int] = {}
    with MemoryTracker(module=model, count_existing=[model, *inputs], timeline=False) as tracker:

        def after_last(module: nn.Module, args: Any, out: Any) -> None:
            if window:
                return  # the first call ends the chain's forward
            window["started"] = 1
            tracker.start_window()
            outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            if outs:

                def at_gradient(grad: Tensor) -> None:
                    window.setdefault("peak", tracker.window_peak_bytes)

                outs[0].register_hook(at_gradient)

        handle = last.register_forward_hook(after_last) if last is not None else None
        try:
            loss_fn(model(*inputs, **kwargs)).backward()
        finally:
            if handle is not None:
                handle.remove()
    existing = unique_storage_bytes(
        iter_tensors(list(model.parameters()), list(model.buffers()), inputs)
    )
    model.zero_grad(set_to_none=True)
    return tracker.peak_bytes - existing, max(0, window.get("peak", existing) - existing)


class _GradientOrder:
    """In the profiling backward: when each parameter's gradient is accumulated, and how many
    were before the first region's input gradient was ready (the chain's backward done)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.chain_done: int | None = None

    def watch(self, model: nn.Module, first_call: Any) -> list[Any]:
        """Hooks to remove after the backward."""

        def accumulated(p: Tensor) -> None:
            self.seen.setdefault(id(p), len(self.seen))

        def chain_done(grad: Tensor) -> None:
            if self.chain_done is None:
                self.chain_done = len(self.seen)

        params = [p for p in model.parameters() if p.requires_grad]
        handles = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
        firsts = [t for t in tree_leaves(first_call) if isinstance(t, Tensor) and t.requires_grad]
        if firsts:
            handles.append(firsts[0].register_hook(chain_done))
        return handles

    def after_the_chain(self) -> set[int]:
        """Ids of the parameters whose gradients appear only after the chain's backward (an
        embedding before the chain): not live while any region runs backward."""
        if self.chain_done is None:
            return set()
        return {pid for pid, k in self.seen.items() if k >= self.chain_done}


def _with_gradient_bytes(
    model: nn.Module,
    chosen: Sequence[tuple[str, nn.Module]],
    profiles: list[RegionProfile],
    after_the_chain: set[int] = frozenset(),
) -> list[RegionProfile]:
    """Add to each region's transient the parameter gradients live during its backward.

    Gradients pile up as backward runs from the last region to the first: while region i
    runs backward, the gradients of regions i+1.. (its own are in its measured transient)
    and of the parameters outside the chain are live, except those that appear only after
    the chain's backward (``after_the_chain``).
    """

    def grad_bytes(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params if p.requires_grad)

    own = [grad_bytes(module.parameters()) for _, module in chosen]
    inside = {id(p) for _, module in chosen for p in module.parameters()}
    outside = grad_bytes(
        p for p in model.parameters() if id(p) not in inside and id(p) not in after_the_chain
    )
    out, later = [], outside
    for profile_, own_bytes in zip(reversed(profiles), reversed(own)):
        # its own gradients are in its measured transient already (_transient_bytes)
        out.append(replace(profile_, transient_bytes=profile_.transient_bytes + later))
        later += own_bytes
    return out[::-1]


def _handed_on(recs: Sequence[dict[str, Any]]) -> list[set[int]]:
    """Per region, the storages it saves that a later region takes as input.

    A region that saves its own output (ReLU, sigmoid, exp save their result) saves the very
    tensor the next region takes as input. The chain model counts a saved input in the
    consumer's saved bytes, so each such tensor is counted once, there, and not in the
    producer's.
    """
    return [
        (rec["saved"].keys() & set().union(*(r["input"][0] for r in recs[i + 1 :])))
        - rec["input"][0]
        for i, rec in enumerate(recs)
    ]


def _union(rec: dict[str, Any], handed: set[int], received: set[int]) -> tuple[int, bool]:
    """A region's saved bytes, its input counted when it is saved (by the region, or by the
    region before as its output: ``received``), and whether it is: a ReLU's input, the
    Linear's output before it, is freed once the ReLU has run, so the ReLU's saved bytes
    leave it out. What it ``handed`` on to a later region is counted there."""
    keys, _ = rec["input"]  # keys exclude pre-existing inputs
    saved_inputs = {k for k in keys if k in rec["saved"] or k in received}
    own = sum(v for k, v in rec["saved"].items() if k not in keys and k not in handed)
    # Part of a several-tensor input saved: counted, and the whole input held on top when a
    # checkpoint holds it (an overcount, on the safe side).
    return own + sum(rec["input_sizes"][k] for k in saved_inputs), saved_inputs == keys


def _store_all_peak(profiles: Sequence[RegionProfile], tail: int) -> int:
    from remat.planner import Chain, store_all_peak

    return store_all_peak(Chain([p.to_region() for p in profiles], tail_bytes=tail))


def _transient_bytes(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, int]:
    """Run the region alone, forward and backward, and return what it allocates on top of
    its saved activations and output: (the forward's excess over what it keeps, the larger
    of that and the backward's excess over what is live when it starts)."""
    args, kwargs = _fresh_inputs(args, kwargs)
    # The region's own parameter gradients appear during its backward as in the real step
    # (the later regions' ones are added by _with_gradient_bytes). The parameters must keep
    # requiring grad: without, a Linear saves no input and runs a smaller graph.
    with _own_gradients(module):
        return _excess_bytes(module, args, kwargs)


@contextlib.contextmanager
def _own_gradients(module: nn.Module) -> Iterator[list[Tensor]]:
    """Run the module's backward alone: its parameters' gradients start at ``None`` and
    are put back afterwards. Yields the trainable parameters."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    stashed = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        yield trainable
    finally:
        for p, g in zip(trainable, stashed):
            p.grad = g


def _fresh_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A region's recorded inputs cut from the model's graph, to run the region alone."""
    from torch.utils._pytree import tree_map

    def fresh(t: Any) -> Any:
        if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
            # Not a leaf, as in the model: a region may write its input in place (an
            # in-place ReLU), which a leaf that requires grad refuses.
            return t.detach().requires_grad_(True).clone()
        return t.detach() if isinstance(t, Tensor) else t

    return tree_map(fresh, (args, kwargs))


def _excess_bytes(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, int]:
    with MemoryTracker(timeline=False) as tracker:
        out = module(*args, **kwargs)
        after_forward = tracker.current_bytes
        forward_excess = tracker.peak_bytes - after_forward  # before the gradients below
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        grads = [torch.ones_like(t) for t in outs]
        before_backward = tracker.current_bytes
        if outs:
            torch.autograd.backward(outs, grads)
    backward_excess = tracker.peak_by_phase["backward"] - before_backward
    return max(0, forward_excess), max(0, forward_excess, backward_excess)


def _pre(name, stack, records, exclude, sync):
    def hook(module, args, kwargs):
        sync()
        rec = records[name]
        if "call" not in rec:  # bytes come from the first (profiled) call; later ones are timed
            rec["call"] = (args, kwargs)  # replayed alone for the transient
            rec["input"] = _storage_bytes((args, kwargs), exclude)
            rec["input_sizes"] = {
                t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
            }  # fmt: skip
            rec["input_versions"] = [
                (t, t._version) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
            ]
        rec["start"] = time.perf_counter()
        stack.append(name)

    return hook


def _post(name, stack, records, exclude, sync):
    def hook(module, args, output):
        sync()
        rec = records[name]
        rec["times"].append(time.perf_counter() - rec["start"])
        rec.setdefault("output", _storage_bytes(output, exclude))
        versions = rec.pop("input_versions", ())
        if any(t._version != v for t, v in versions):  # checkpointing it would raise
            rec["writes_input"] = True
        if stack and stack[-1] == name:
            stack.pop()

    return hook


def _region_flops(model, chosen, inputs, kwargs) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs, **kwargs)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    return {name: sum(counts.get(f"{prefix}.{name}", {}).values()) for name, _ in chosen}
