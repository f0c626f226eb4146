"""What a profile is: per region (and per op inside it) cost and bytes, and its chain.

``Profile`` is plain data with a JSON round-trip; ``Profile.to_chain()`` turns it into the
planner's problem, with each region's op-level menu on the engine its plans use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from remat.policy.op_level import OP_PRESETS
from remat.solver.chain_dp import store_all_peak
from remat.solver.op_menu import Op, saving_option, with_ops
from remat.solver.problem import Chain, Region, offload_cost
from remat.solver.shared_input import SharedInput

__all__ = [
    "OP_ENGINE_CHOICES",
    "OpProfile",
    "Profile",
    "RegionProfile",
    "op_engine",
    "store_all_peak_of",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class OpProfile:
    """One op inside a region: ``name`` is ``"<overload>#<k>"``, its k-th call in the region;
    ``output_saved``: autograd saves its output for backward (see ``solver.Op``);
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
        output_gradient_bytes: the gradients its outputs receive in the step (``None``:
            ``output_bytes``); less when the model drops an output (the attention
            probabilities a layer returns beside its hidden state), which gets none.
        transient_bytes: the most it allocates beyond its saved activations and output while
            it runs backward on its own (gradients in flight, workspaces), with the
            parameter gradients live then; and forward, where ``forward_transient_bytes``
            is ``None``.
        ops: its ops, in call order.
        input_saved: whether its input is saved for backward (see ``solver.Region``).
        forward_transient_bytes: the most it allocates beyond what it keeps while it runs
            forward (a temporary its backward never makes is not in ``transient_bytes``).
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
            recomputation would start from the written input (``solver.Region``). Its
            op-level options run on the tape, which copies what it holds before a write.
        segment_break: why a segment cannot carry on into it from the region before
            (``""``: it can): its input is not an output of that region (``solver.Region``).
        recompute_forward_transient_bytes, recompute_transient_bytes: the same as
            ``forward_transient_bytes`` and ``transient_bytes`` with the region under its own
            checkpoint, beyond its input and its output (or its output's gradient), the
            parameter gradients live during its backward included (``solver.Region``);
            ``None``: not measured (it cannot be recomputed from its input).
        later_gradient_bytes: the parameter gradients live while it runs backward besides
            its own (``solver.Region``).
        held_bytes: what its forward, run under its own checkpoint, leaves live beyond its
            output: held outside autograd's graph (a KV cache filled in training), so it is
            only stored (``solver.Region``).
        saved_input_bytes: the part of its input something saves (``None``: all of it
            when ``input_saved``, none otherwise; ``solver.Region``).
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
    segment_break: str = ""
    recompute_forward_transient_bytes: int | None = None
    recompute_transient_bytes: int | None = None
    later_gradient_bytes: int = 0
    held_bytes: int = 0
    output_gradient_bytes: int | None = None
    saved_input_bytes: int | None = None

    def with_backward_at_least(self, nbytes: int) -> RegionProfile:
        """The region with its backward transients, stored or recomputed, at least
        ``nbytes``: what runs backward just before it (ops between regions) reaches."""
        rerun = self.recompute_transient_bytes
        return replace(
            self,
            transient_bytes=max(self.transient_bytes, nbytes),
            recompute_transient_bytes=None if rerun is None else max(rerun, nbytes),
        )

    def with_later_gradients(self, nbytes: int) -> RegionProfile:
        """The region with ``nbytes`` more parameter gradients live beside its backward
        (fewer when negative: a rank's share under FSDP). Its transients, measured with the
        region alone, carry them, stored or recomputed."""
        rerun = self.recompute_transient_bytes
        return replace(
            self,
            transient_bytes=self.transient_bytes + nbytes,
            recompute_transient_bytes=None if rerun is None else rerun + nbytes,
            later_gradient_bytes=self.later_gradient_bytes + nbytes,
        )

    @property
    def rerun_ops(self) -> tuple[OpProfile, ...]:
        """The ops a recomputation of the region runs."""
        return self.ops if self.recompute_ops is None else self.ops[: self.recompute_ops]

    def to_region(self) -> Any:
        """The planner's ``Region`` (no op-level options)."""

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
            segment_break=self.segment_break,
            recompute_forward_transient_bytes=self.recompute_forward_transient_bytes,
            recompute_transient_bytes=self.recompute_transient_bytes,
            later_gradient_bytes=self.later_gradient_bytes,
            held_bytes=self.held_bytes,
            output_gradient_bytes=self.output_gradient_bytes,
            saved_input_bytes=self.saved_input_bytes,
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
        outside_bytes: what lives outside the chain while it runs (what ran before it
            saved, the inputs several regions share), plus any part of the measured peak
            the model does not explain; planning subtracts it from the budget.
        before_chain_peak_bytes, after_chain_peak_bytes: the step's peaks before the
            chain's forward starts and after its backward ends (an embedding's backward
            with every parameter gradient live): no plan goes below them
            (:meth:`step_peak_for`).
        forward_cost: the whole model's forward cost, for relative overheads.
        tail_bytes: what the model adds after the chain (head, loss and their backward) on
            top of what the chain holds then, measured between the last region's forward
            and its backward (``solver.Chain.tail_bytes``).
        op_engines: the engines its op-level options run on (``remat.profile``'s
            ``op_engines``: ``"auto"`` or ``"replay"``).
        host_bandwidth: bytes per second between the device and host memory, when costs
            are seconds on a device apart from the host (a GPU ``target_device``); then
            offloading is on each region's menu (``problem.offload_cost``). ``0``: it is not.
        shared_inputs: the tensors several regions take (a mask, rotary tables), counted
            once, by the chain, live or not in the backward depending on the plan
            (``solver.SharedInput``); not in ``outside_bytes``.
    """

    regions: tuple[RegionProfile, ...]
    cost_unit: str
    device: str
    step_peak_bytes: int
    outside_bytes: int
    forward_cost: float
    tail_bytes: int = 0
    op_engines: str = "auto"
    host_bandwidth: float = 0.0
    before_chain_peak_bytes: int = 0
    after_chain_peak_bytes: int = 0
    shared_inputs: tuple[SharedInput, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def step_peak_for(self, chain_peak_bytes: int) -> int:
        """The step's predicted peak for a plan whose chain peaks at ``chain_peak_bytes``
        (``solver.simulate``): what lives outside the chain added, or the peak before or
        after the chain where that is higher."""
        return max(
            chain_peak_bytes + self.outside_bytes,
            self.before_chain_peak_bytes,
            self.after_chain_peak_bytes,
        )

    @property
    def unplannable_bytes(self) -> int:
        """The least any plan's predicted peak can be: the peaks outside the chain."""
        return max(self.before_chain_peak_bytes, self.after_chain_peak_bytes)

    def to_chain(
        self, *, op_options: bool = True, max_options: int = 8, every_preset: bool = False
    ) -> Any:
        """The planner's problem for these regions (op-level menus when ``op_options``;
        ``every_preset``: each named op preset in every menu, even where another option
        keeps no more for no more cost, to predict that preset everywhere)."""

        regions = []
        menus: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for r in self.regions:
            region = r.to_region()
            ops = [
                Op(name=o.name, output_bytes=o.output_bytes, recompute_cost=o.cost,
                   output_saved=o.output_saved)
                for o in r.rerun_ops if o.output_bytes > 0 and o.saveable
            ]  # fmt: skip
            if op_options and ops:
                overhead = r.op_overhead
                # the layers of a transformer have the same menu: solved once
                key = (tuple(ops), region.options, region.input_bytes, region.rerun_cost,
                       region.saved_with_input_bytes, region.store_only, overhead)  # fmt: skip
                if key not in menus:
                    region = with_ops(region, ops, max_options=max_options, overhead=overhead)
                    region = with_preset_options(region, ops, overhead, every=every_preset)
                    menus[key] = region.options
                region = replace(region, options=menus[key])
                # A region that writes its input runs op-level on the tape only: the
                # replay reruns it from the written input.
                engine = "tape" if r.store_only else op_engine(r.ops, self.op_engines)
                region = on_engine(region, engine)
            if self.host_bandwidth > 0 and self.cost_unit == "seconds":
                moved = region.saved_bytes - region.offload_kept_bytes
                cost = offload_cost(moved, r.cost, self.host_bandwidth)
                region = replace(region, offload_cost=cost)
            regions.append(region)
        return Chain(regions, tail_bytes=self.tail_bytes, shared_inputs=self.shared_inputs)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        regions = tuple(
            RegionProfile(**{**r, "ops": tuple(OpProfile(**o) for o in r["ops"])})
            for r in data.pop("regions")
        )
        shared = tuple(SharedInput(**t) for t in data.pop("shared_inputs", ()))
        return cls(regions=regions, shared_inputs=shared, **data)


OP_ENGINE_CHOICES = ("auto", "replay")


def op_engine(ops: Sequence[Any], choice: str = "auto") -> str:
    """The op-level engine a region's plans use. ``"auto"``: ``"tape"`` (no replay, less
    fixed cost) when every op of the region may be recomputed from its arguments,
    ``"replay"`` when it has a random or in-place op, whose outputs the tape would keep
    beyond the menu's bytes. ``"replay"``: always the replay."""
    if choice == "auto" and ops and all(o.saveable and o.recomputable for o in ops):
        return "tape"
    return "replay"


def on_engine(region: Any, engine: str) -> Any:
    return replace(region, options=tuple(replace(o, engine=engine) for o in region.options))


def with_preset_options(
    region: Any, ops: Sequence[Any], overhead: float = 0.0, *, every: bool = False
) -> Any:
    """Add the named op presets (``"save-matmuls"``...) to a region's menu.

    The knapsack menu is thinned to a few options spread over memory, which can drop the
    well-known good ones (keep every matmul, recompute the pointwise ops); they are added
    back by name, unless an option of the menu keeps no more bytes for no more cost
    (``every``: added whenever the region runs one of the preset's ops).
    """

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
            and 0 <= cost < region.rerun_cost
        )
        dominated = any(o.kept_bytes <= kept and o.recompute_cost <= cost for o in options)
        if every or (inside and not dominated):
            options.append(new)
    return replace(region, options=tuple(options))


def store_all_peak_of(
    profiles: Sequence[RegionProfile], tail: int, shared: Sequence[SharedInput] = ()
) -> int:
    """The peak of storing every region of ``profiles`` (``tail``: the head's bytes)."""
    return store_all_peak(
        Chain([p.to_region() for p in profiles], tail_bytes=tail, shared_inputs=shared)
    )
