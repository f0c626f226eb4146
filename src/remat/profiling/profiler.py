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

A model on the meta device runs on fake copies of its parameters (``FakeTensorMode``, as in
``remat.estimate``), so models that ask their tensors for values (transformers' masks) run.

Candidate regions are, by default, the children of the model's repeated-block lists (the
``blocks`` of a GPT, the ``layers`` of a Llama); a model without such a list is a chain of
its direct children.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.errors import PlanError, check_choice
from remat.measure.training_call import (
    check_loss_fn,
    default_loss,
    require_train_mode,
    training_call,
)
from remat.profiling.fake_model import faked_meta_model
from remat.profiling.gradients import with_gradient_bytes
from remat.profiling.op_recording import OpRecord, received_output_gradient
from remat.profiling.profile_data import (
    OP_ENGINE_CHOICES,
    OpProfile,
    Profile,
    RegionProfile,
    store_all_peak_of,
)
from remat.profiling.recording import Recording, record_regions
from remat.profiling.region_record import RegionRecord
from remat.profiling.regions import default_regions
from remat.profiling.run_alone import recompute_transient_bytes, transient_bytes
from remat.profiling.saved_bytes import handed_on, saved_union
from remat.profiling.shared_inputs import (
    SharedInputs,
    first_region_shared_bytes,
    in_order,
    made_before_chain,
    shared_gradient_bytes,
    shared_in_step,
    shared_inputs,
)
from remat.profiling.step import measure_step, state_kept
from remat.profiling.step_memory import StepMemory
from remat.solver.shared_input import SharedInput
from remat.targets.devices import Target, get_target
from remat.targets.kernels import target_kernels

__all__ = ["profile"]


def _segment_break(chosen: list[tuple[str, Any]], records: dict[str, RegionRecord], i: int) -> str:
    """Why a segment cannot carry on into region ``i`` (``""``: it can): none of its inputs
    is an output of region ``i - 1`` (code between them makes its input, ``x = block(x) *
    scale``, or it takes the model's input)."""
    if i == 0:
        return ""
    before = chosen[i - 1][0]
    if before in records[chosen[i][0]].takes_output_of:
        return ""
    return f"its input is not an output of {before!r}: the model makes it between them"


def profile(
    model: nn.Module,
    *inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    regions: Sequence[str] | None = None,
    repeats: int = 3,
    op_engines: str = "auto",
    target_device: str | Target | None = None,
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
        target_device: the device to plan for (``"h100"``, ``"a100"``, ``"cpu"``..., or a
            :class:`~remat.targets.devices.Target`): costs are the ops' predicted seconds
            there (roofline: FLOPs or bytes, plus launch) instead of measured ones, so a
            model on the meta device is planned for a GPU this machine does not have. On
            meta, dropout and attention also keep what the target's kernels keep
            (:mod:`remat.targets.kernels`). ``None``: measured times (FLOPs plus
            bytes on meta).
        **kwargs: keyword inputs of the model (a model input may be named ``target``: the
            option is ``target_device`` so that it cannot take its place).

    Returns:
        A :class:`Profile`.

    Profiling runs the model several times; its buffers (BatchNorm statistics), its
    parameters' gradients and the RNG state are put back as they were.

    Raises:
        TypeError: ``model`` is not a module; ``repeats``, ``loss_fn``, ``regions`` or
            ``op_engines`` has a wrong type.
        ValueError: ``repeats`` below 1, ``op_engines`` not ``"auto"`` or ``"replay"``, an
            unknown ``target_device``.
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
    check_choice("remat.profile", "op_engines", op_engines, OP_ENGINE_CHOICES)
    device = None if target_device is None else get_target(target_device)
    require_train_mode(model, "remat.profile")
    with (
        state_kept(model),
        training_call(model),
        target_kernels(device),
        faked_meta_model(model, inputs, kwargs) as (inputs, kwargs),
    ):
        return _profile(model, inputs, kwargs, loss_fn, regions, repeats, op_engines, device)


def _held_note(held: int) -> str:
    return (
        f"its forward leaves {held:,} B held outside autograd's graph (a cache the model "
        "fills): a segment would not free them"
        if held
        else ""
    )


def _profile(
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_fn: Callable[[Any], Tensor] | None,
    regions: Sequence[str] | None,
    repeats: int,
    op_engines: str = "auto",
    target: Target | None = None,
) -> Profile:
    """The three steps: record the regions over one training step (``recording``), cost
    each region (``_region_profile``), and assemble them with the measured step's memory
    (``_assemble``)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on_meta = device.type == "meta"
    loss_of = loss_fn or default_loss
    recording = record_regions(
        model,
        inputs,
        kwargs,
        loss_of,
        _chosen_regions(model, regions),
        default=regions is None,
        repeats=repeats,
        op_engines=op_engines,
        target=target,
        timed=not on_meta and target is None,
    )
    chosen = recording.chosen
    step = measure_step(
        model,
        inputs,
        loss_of,
        kwargs,
        first=chosen[0][1],
        last=chosen[-1][1],
        regions=[module for _, module in chosen],
    )
    costs = "target" if target is not None else "meta" if on_meta else "timed"
    recs = [recording.records[name] for name, _ in chosen]
    # first: it takes the inputs several regions share out of each region's record
    shared = shared_inputs(recs, made_before_chain([rec.call for rec in recs], step))
    handed = handed_on(recs)
    alone: dict[tuple[Any, ...], Any] = {}  # regions alike are run alone once
    profiles = [_region_profile(recording, i, handed, costs, alone) for i in range(len(chosen))]
    return _assemble(
        model,
        recording,
        profiles,
        step,
        shared,
        cost_unit="flops+bytes" if costs == "meta" else "seconds",
        device=str(device),
        op_engines=op_engines,
        # Offloading only means something where the device's memory is not the host's.
        host_bandwidth=target.host_bandwidth if target and target.kernels == "cuda" else 0.0,
        # The default discovery can be repeated on a model a plan is applied to, to tell a
        # plan made for another model (fewer blocks) from one for this model.
        meta={
            "model": type(model).__name__,
            "default_regions": regions is None,
            "regions_not_run": recording.not_run,
            **({} if target is None else {"target": target.name}),
        },
    )


def _chosen_regions(model: nn.Module, regions: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The candidate regions: ``regions`` by name, else the default ones."""
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
    return chosen


def _region_profile(
    recording: Recording,
    i: int,
    handed: list[set[int]],
    costs: str,
    alone: dict[tuple[Any, ...], Any],
) -> RegionProfile:
    """Region ``i`` of the recording: its bytes from its record, its transients measured by
    running it on its own (``run_alone``; ``alone`` holds what regions alike measured),
    its cost and its ops' (``_costs``)."""
    name, module = recording.chosen[i]
    rec = recording.records[name]
    received = set().union(*handed[:i]) & rec.input.keys
    saved_bytes, input_saved, saved_input = saved_union(rec, handed[i], received)
    # the producer still needs what it hands on in its own backward, after the consumer's
    # backward has released it
    moved = sum(rec.saved[k] for k in handed[i])
    gradient_held = rec.gradient_held
    seeded = received_output_gradient(rec)
    ops = recording.ops.get(name, [])
    key = _alike(module, rec, ops, seeded)
    if key not in alone:
        alone[key] = (
            transient_bytes(module, *rec.call, gradient_held, seeded),
            # A region that writes its input is never recomputed alone (store_only)
            (None, None, 0)
            if rec.writes_input
            else recompute_transient_bytes(module, *rec.call, gradient_held, seeded),
        )
    (forward_transient, transient), (rerun_forward, rerun, held) = alone[key]
    cost, op_costs = _costs(rec, ops, recording.flops.get(name, 0), costs)
    overhead = recording.overheads.get(name)
    return RegionProfile(
        name=name,
        type=type(module).__name__,
        cost=cost,
        flops=int(recording.flops.get(name, 0)),
        input_bytes=rec.input.nbytes,
        saved_bytes=saved_bytes,
        input_saved=input_saved,
        saved_input_bytes=saved_input,
        output_bytes=rec.output.nbytes,
        output_gradient_bytes=sum(rec.output_sizes[k] for k in seeded),
        transient_bytes=transient + moved,
        forward_transient_bytes=forward_transient,
        recompute_ops=rec.rerun_ops,
        op_overhead=overhead or 0.0,
        store_only="writes its input in place" if rec.writes_input else "",
        segment_break=_segment_break(recording.chosen, recording.records, i) or _held_note(held),
        held_bytes=held,
        recompute_forward_transient_bytes=rerun_forward,
        recompute_transient_bytes=rerun,
        ops=tuple(
            OpProfile(
                name=o.name,
                output_bytes=o.output_bytes,
                cost=c,
                output_saved=not o.output_bytes or o.output_saved,
                # no op-level plan where op-level checkpointing failed to run
                saveable=o.saveable and not (name in recording.overheads and overhead is None),
                recomputable=o.recomputable,
            )
            for o, c in zip(ops, op_costs)
        ),
    )


def _alike(
    module: nn.Module, rec: RegionRecord, ops: Sequence[OpRecord], seeded: frozenset[int]
) -> tuple[Any, ...]:
    """What a region's run alone depends on: its type and parameters, its inputs' shapes and
    which of them share a storage, the ops its forward ran with their output bytes and
    saves, and which outputs get a gradient. The layers of a transformer match: their
    transients are measured once (half of a 32-layer profile's time otherwise)."""
    leaves = tree_leaves(rec.call)
    storages: dict[int, int] = {}
    inputs = tuple(
        (tuple(t.shape), t.stride(), t.dtype, t.requires_grad,
         storages.setdefault(t.untyped_storage()._cdata, len(storages)))
        if isinstance(t, Tensor)
        else type(t).__name__
        for t in leaves
    )  # fmt: skip
    params = tuple((tuple(p.shape), p.dtype, p.requires_grad) for p in module.parameters())
    return (
        type(module),
        params,
        inputs,
        tuple((o.name, o.output_bytes, o.output_saved, o.saveable) for o in ops),
        seeded,
        rec.gradient_held,
        rec.writes_input,
    )


def _costs(
    rec: RegionRecord, ops: Sequence[OpRecord], flops: int, costs: str
) -> tuple[float, list[float]]:
    """A region's cost and its ops' shares: predicted seconds on the target, FLOPs plus
    bytes on meta, or the median timed forward split by the ops' measured shares."""
    if costs == "target":
        return sum(o.seconds for o in ops), [o.seconds for o in ops]
    if costs == "meta":  # FLOPs per op are not broken out
        return float(flops + sum(o.output_bytes for o in ops)), [float(o.output_bytes) for o in ops]
    cost = statistics.median(rec.times) if rec.times else 0.0
    total = sum(o.seconds for o in ops) or 1.0
    return cost, [cost * o.seconds / total for o in ops]  # scaled to the timed forward


def _assemble(
    model: nn.Module,
    recording: Recording,
    profiles: list[RegionProfile],
    step: StepMemory,
    shared: SharedInputs,
    **identity: Any,
) -> Profile:
    """The regions with what the measured step says around them: the shared inputs, what
    lives outside the chain, the gradients beside each region's backward, the tail;
    ``shared``: the inputs several regions take; ``identity``: the profile's other
    fields (device, cost unit, ...)."""
    recs = [recording.records[name] for name, _ in recording.chosen]
    calls = [rec.call for rec in recs]
    chain_shared, made_before, live_at_backward = shared_in_step(
        shared, calls, step, recording.saved_outside
    )
    # Live through the whole chain, outside it: what ran before the chain saved. The step
    # measured it at the chain's start, beside the first region's input and the shared
    # inputs made by then, which the chain counts (``SharedInput``).
    base = max(
        0, step.at_chain_start - step.first_input - made_before + first_region_shared_bytes(shared)
    )
    # Of which the forward may drop some once the chain has started (no plan changes that):
    # live through the forward only, as a shared input no region takes.
    dropped = 0
    if step.before_chain_at_chain_backward is not None:
        dropped = max(0, base - step.before_chain_at_chain_backward)
        base -= dropped
    # What a region leaves held outside the graph (a cache the forward fills) is live in the
    # forward from then on: forward-only too. Whatever keeps it into the backward, the
    # measured step shows there (``head_left``, the tail).
    forward_only = [dropped, *(p.held_bytes for p in profiles)]
    chain_shared = in_order(
        [*chain_shared, *(SharedInput(nbytes=n, takers=()) for n in forward_only if n)]
    )
    chain_kept = sum(p.saved_bytes for p in profiles)  # store-all: every saved byte
    # what the measured step held at the chain's backward beside the chain: the shared
    # inputs still live then are the chain's
    beside = base + live_at_backward + chain_kept
    head_left = (
        None
        if step.at_chain_backward is None
        else max(0, step.at_chain_backward - beside - step.output_gradient)
    )
    grad_order = recording.grad_order
    profiles = with_gradient_bytes(
        model,
        recording.chosen,
        profiles,
        grad_order.after_the_chain(),
        head_left,
        step.loss,
        shared_gradient_bytes(shared, recs, calls, step),
        set(grad_order.seen),
        step,
    )
    # The tail sits on top of everything the chain keeps and the shared inputs live then.
    tail = max(0, step.tail_peak - beside)
    chain_peak = store_all_peak_of(profiles, tail, chain_shared)
    # What the model above leaves unexplained of the measured step is added where the chain
    # is, so that no plan is predicted under what the step measured.
    explained = max(step.before_chain_peak, step.after_chain_peak, base + chain_peak)
    return Profile(
        regions=tuple(profiles),
        tail_bytes=tail,
        step_peak_bytes=step.peak,
        outside_bytes=base + max(0, step.peak - explained),
        shared_inputs=chain_shared,
        before_chain_peak_bytes=step.before_chain_peak,
        after_chain_peak_bytes=step.after_chain_peak,
        forward_cost=sum(p.cost for p in profiles),
        **identity,
    )
