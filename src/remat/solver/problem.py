"""The planner's data: the problem (``Region``, ``Chain``) and its answer (``Plan``).

Everything here is plain data with a JSON round-trip and no reference to torch modules, so a
profile taken on one machine can be planned on another and a plan can be reviewed before it is
applied. The memory model that gives a plan its predicted peak lives in ``solver/memory_model.py``;
the inputs several regions share in ``solver/shared_input.py``, the field checks in
``solver/validation.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from remat.solver.shared_input import SharedInput
from remat.solver.validation import check_bytes, check_cost

__all__ = [
    "ACTIONS",
    "Action",
    "Chain",
    "Region",
    "RegionOption",
    "SharedInput",
    "check_bytes",
    "check_cost",
    "offload_cost",
    "option_index",
]


# What a region does with its activations between its forward and its backward.
STORE, RECOMPUTE, OPS, OFFLOAD = "store", "recompute", "ops", "offload"


Action = Literal["store", "recompute", "ops", "offload"]
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionOption:
    """One way to keep a region's activations: save some of them, recompute the rest.

    Attributes:
        name: unique within the region; ``"store"`` and ``"recompute"`` are the built-ins.
        kept_bytes: bytes held from the region's forward until its backward, the region's
            input included (store: ``saved_bytes``; recompute: ``input_bytes``).
        recompute_cost: what the option adds to the step: forward work redone in backward
            (store: 0; recompute: the region's ``rerun_cost``; offload: the host transfer
            time not hidden behind compute, ``Region.offload_cost``).
        save_ops: names of the ops whose outputs are saved (op-level options only).
        kind: ``"store"``, ``"recompute"``, ``"ops"`` (an op-level mix of the two) or
            ``"offload"`` (what the region saves goes to host memory until its backward).
        backward_extra_bytes: what the option holds during the region's backward beyond the
            region's saved activations: saved op outputs that autograd itself would not
            keep stay in the selective-checkpoint cache until the region's backward ends.
        engine: how an op-level option runs (``remat.Ops.engine``): ``"replay"`` re-runs the
            region in backward, ``"tape"`` recomputes single saved tensors, with less fixed
            cost, but only keeps to the menu's bytes where no op is random or in-place.
    """

    name: str
    kept_bytes: int
    recompute_cost: float
    save_ops: tuple[str, ...] = ()
    kind: Action = OPS
    backward_extra_bytes: int = 0
    engine: str = "replay"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RegionOption: name must be a non-empty str, got {self.name!r}")
        check_bytes(f"option {self.name!r}", "kept_bytes", self.kept_bytes)
        check_cost(f"option {self.name!r}", "recompute_cost", self.recompute_cost)
        check_bytes(f"option {self.name!r}", "backward_extra_bytes", self.backward_extra_bytes)
        if self.kind not in ACTIONS:
            raise ValueError(f"option {self.name!r}: kind must be one of {ACTIONS}")
        if self.engine not in ("replay", "tape"):
            raise ValueError(f"option {self.name!r}: engine must be 'replay' or 'tape'")
        object.__setattr__(self, "save_ops", tuple(self.save_ops))


@dataclass(frozen=True, kw_only=True, slots=True)
class Region:
    """One link of the chain: a module (or run of modules) that may be checkpointed.

    Attributes:
        name: unique within the chain (a module's qualified name, for ``apply``).
        fwd_cost: forward cost, in any unit (FLOPs or seconds) as long as the chain agrees.
        input_bytes: the region's input, what a checkpoint keeps.
        saved_bytes: what autograd keeps for the region's backward when it runs normally,
            counting its input when something saves it (``input_saved``); so then
            ``saved_bytes >= input_bytes``.
        output_bytes: the region's output (normally the next region's input); while the region
            runs forward its output is live, and while it runs backward its output's gradient.
        transient_bytes: any further peak while the region runs backward (workspace, its
            input's gradient being produced), and forward where ``forward_transient_bytes``
            is ``None``.
        options: op-level options between store and recompute (see ``solver.op_menu``).
        input_saved: whether autograd saves the region's input (the region itself, or the
            region before it saving its output). ``False`` for a ReLU after a Linear: the ReLU
            keeps its output, and the Linear's output is freed once the ReLU has run, unless a
            checkpoint holds it. Then ``saved_bytes`` leaves the input out.
        forward_transient_bytes: the further peak while it runs forward (``None``:
            ``transient_bytes``). Gradients in flight and parameter gradients piling up
            exist only in the backward, a temporary made under ``no_grad`` only in the
            forward.
        recompute_cost: what recomputing the region alone redoes (``None``: ``fwd_cost``).
            Less than ``fwd_cost`` when its backward needs nothing from its last ops: the
            recomputation stops once the last needed tensor is back (early stop), so a
            block ending in a Linear and a residual add never reruns them.
        store_only: why the region cannot be recomputed from its input (``""``: it can).
            A region that writes its input in place (``nn.ReLU(inplace=True)`` on its own)
            is never recomputed alone and never starts a segment; inside a segment it is
            fine (its input is recomputed, and the write with it), and its op-level options
            run on the tape. Plan tables say why.
        segment_break: why a segment cannot carry on into this region from the one before
            (``""``: it can). The model makes this region's input outside the regions (``x
            = block(x) * scale``) instead of handing it the previous region's output, so a
            segment's region ends there (remat's segments carry on only through outputs of
            their own calls), and a plan whose segment crosses it would keep more than the
            chain model says.
        offload_cost: what offloading it adds to the step (``None``: it is not offered).
        recompute_forward_transient_bytes: what its forward allocates beyond its input and
            its output when it runs under its own checkpoint (``None``: not measured; the
            stored forward's transient stands in).
        recompute_transient_bytes: what its backward allocates beyond its input (held by
            the checkpoint) and its output's gradient when it is recomputed: the saved
            activations rebuilt, the forward's temporaries (the output itself, when the
            recomputation runs to the end) while the output's gradient is live, then the
            backward proper. ``None``: not measured; the stored backward stands in.
        later_gradient_bytes: the parameter gradients live while it runs backward besides
            its own (those of the regions after it and of the parameters outside the chain,
            counted in its transients already). A segment ending with this region reruns
            its forward while they are live, beside its output's gradient.
        held_bytes: what its forward leaves held outside autograd's graph (a KV cache the
            model fills even in training, as XLM's attention does): no checkpoint, op-level
            policy or offload frees it, and whoever holds it may keep it past the region's
            backward, so the region is only stored (``menu``) and never in a segment.
        output_gradient_bytes: the gradient its output receives, live while it runs
            backward (``None``: ``output_bytes``); less when the model drops part of the
            output (a layer's attention probabilities), which gets no gradient.
        saved_input_bytes: the part of a several-tensor input that something saves,
            counted in ``saved_bytes`` (``None``: all of it when ``input_saved``, none
            otherwise). A layer saving its hidden state but not the mask beside it holds
            only the mask on top while it runs, or under a checkpoint.
    """

    name: str
    fwd_cost: float
    input_bytes: int
    saved_bytes: int
    output_bytes: int
    transient_bytes: int = 0
    options: tuple[RegionOption, ...] = ()
    input_saved: bool = True
    forward_transient_bytes: int | None = None
    recompute_cost: float | None = None
    store_only: str = ""
    segment_break: str = ""
    offload_cost: float | None = None
    recompute_forward_transient_bytes: int | None = None
    recompute_transient_bytes: int | None = None
    later_gradient_bytes: int = 0
    held_bytes: int = 0
    output_gradient_bytes: int | None = None
    saved_input_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Region: name must be a non-empty str, got {self.name!r}")
        owner = f"region {self.name!r}"
        for attr in ("store_only", "segment_break"):
            if not isinstance(getattr(self, attr), str):
                raise ValueError(f"{owner}: {attr} must be a str, got {getattr(self, attr)!r}")

        check_cost(owner, "fwd_cost", self.fwd_cost)
        if self.recompute_cost is not None:
            check_cost(owner, "recompute_cost", self.recompute_cost)
            if self.recompute_cost > self.fwd_cost:
                raise ValueError(
                    f"{owner}: recompute_cost ({self.recompute_cost}) is more than the forward "
                    f"it reruns (fwd_cost={self.fwd_cost})"
                )
        if self.offload_cost is not None:
            check_cost(owner, "offload_cost", self.offload_cost)
        for attr in (
            "input_bytes",
            "saved_bytes",
            "output_bytes",
            "transient_bytes",
            "later_gradient_bytes",
            "held_bytes",
        ):
            check_bytes(owner, attr, getattr(self, attr))
        for attr in (
            "forward_transient_bytes",
            "recompute_forward_transient_bytes",
            "recompute_transient_bytes",
            "output_gradient_bytes",
            "saved_input_bytes",
        ):
            if getattr(self, attr) is not None:
                check_bytes(owner, attr, getattr(self, attr))
        if self.saved_input_bytes is not None and self.saved_input_bytes > min(
            self.input_bytes, self.saved_bytes
        ):
            raise ValueError(
                f"{owner}: saved_input_bytes ({self.saved_input_bytes}) is part of the input "
                f"(input_bytes={self.input_bytes}) counted in saved_bytes "
                f"({self.saved_bytes}), so at most the smaller"
            )
        if not isinstance(self.input_saved, bool):
            raise ValueError(f"{owner}: input_saved must be a bool, got {self.input_saved!r}")
        if self.input_saved and self.saved_bytes < self.input_bytes:
            raise ValueError(
                f"{owner}: saved_bytes ({self.saved_bytes}) must count the input "
                f"(input_bytes={self.input_bytes}), so saved_bytes >= input_bytes"
            )
        opts = tuple(RegionOption(**o) if isinstance(o, dict) else o for o in self.options)
        names = {STORE, RECOMPUTE, OFFLOAD}
        for o in opts:
            if not isinstance(o, RegionOption) or o.kind != OPS:
                raise ValueError(f"{owner}: options must be op-level RegionOptions, got {o!r}")
            if o.name in names:
                raise ValueError(f"{owner}: duplicate option name {o.name!r}")
            names.add(o.name)
            if not self.input_bytes <= o.kept_bytes <= self.saved_with_input_bytes:
                raise ValueError(
                    f"{owner}: option {o.name!r} keeps {o.kept_bytes} bytes, outside "
                    f"[input_bytes={self.input_bytes}, "
                    f"saved_with_input_bytes={self.saved_with_input_bytes}]"
                )
        object.__setattr__(self, "options", opts)

    @property
    def forward_extra_bytes(self) -> int:
        """The transient reached in the forward."""
        ftr = self.forward_transient_bytes
        return self.transient_bytes if ftr is None else ftr

    @property
    def unsaved_input_bytes(self) -> int:
        """The part of its input nothing saves (``saved_input_bytes``): live beside its
        saved activations while it runs forward, or while a checkpoint holds it."""
        if self.saved_input_bytes is not None:
            return self.input_bytes - self.saved_input_bytes
        return 0 if self.input_saved else self.input_bytes

    @property
    def saved_with_input_bytes(self) -> int:
        """What a checkpoint of this region that saved every op would keep: its saved
        activations and its input (which the checkpoint holds)."""
        return self.saved_bytes + self.unsaved_input_bytes

    @property
    def rerun_cost(self) -> float:
        """The cost of its ``recompute`` option: ``recompute_cost``, else ``fwd_cost``."""
        return self.fwd_cost if self.recompute_cost is None else self.recompute_cost

    @property
    def backward_bytes(self) -> int:
        """Bytes live for this region while it runs backward, the part of its input nothing
        saves aside (``unsaved_input_bytes``): a checkpoint holding it adds that."""
        return self.saved_bytes + self.output_gradient + self.transient_bytes

    @property
    def output_gradient(self) -> int:
        """The gradient its output receives: ``output_gradient_bytes``, else ``output_bytes``."""
        grad = self.output_gradient_bytes
        return self.output_bytes if grad is None else grad

    @property
    def why_stored_only(self) -> str:
        """Why the region cannot be recomputed from its input (``""``: it can): it writes
        its input (``store_only``), or holds bytes outside the graph (``held_bytes``)."""
        if self.store_only or not self.held_bytes:
            return self.store_only
        return f"holds {self.held_bytes:,} B outside autograd's graph (a cache the model fills)"

    @property
    def offload_kept_bytes(self) -> int:
        """What offloading keeps on the device: its input, when something saves it (as a
        checkpoint does: the region before may hold it anyway, and moving it would bring
        a second copy back). The rest of ``saved_bytes`` moves."""
        return self.input_bytes - self.unsaved_input_bytes

    def menu(self) -> tuple[RegionOption, ...]:
        """Store, recompute, the op-level options, then offload: no recompute if
        ``store_only``, no offload without an ``offload_cost`` or with nothing to move; only
        store when it holds bytes outside the graph (``held_bytes``)."""
        store = RegionOption(name=STORE, kept_bytes=self.saved_bytes, recompute_cost=0, kind=STORE)
        if self.held_bytes:
            return (store,)
        menu = [store]
        if not self.store_only:
            menu.append(
                RegionOption(
                    name=RECOMPUTE,
                    kept_bytes=self.input_bytes,
                    recompute_cost=self.rerun_cost,
                    kind=RECOMPUTE,
                )
            )
        menu += self.options
        if self.offload_cost is not None and self.saved_bytes > self.offload_kept_bytes:
            menu.append(
                RegionOption(
                    name=OFFLOAD,
                    kept_bytes=self.offload_kept_bytes,
                    recompute_cost=self.offload_cost,
                    kind=OFFLOAD,
                )
            )
        return tuple(menu)


@dataclass(frozen=True, slots=True, init=False)
class Chain:
    """A chain of regions run one after the other: the planner's problem.

    ``tail_bytes``: what the rest of the model (a head, the loss) adds, between the chain's
    forward and its backward, on top of everything the chain holds then: the peak of an LM
    head's logits and their gradient sits on top of every block's kept activations.
    ``shared_inputs``: the tensors several regions take (:class:`SharedInput`), counted
    once, live or not in the backward depending on the plan.

    Example:
        >>> Chain([Region(name="a", fwd_cost=1, input_bytes=4, saved_bytes=8, output_bytes=4)])
    """

    regions: tuple[Region, ...]
    tail_bytes: int = 0
    shared_inputs: tuple[SharedInput, ...] = ()

    def __init__(
        self,
        regions: Iterable[Region],
        tail_bytes: int = 0,
        shared_inputs: Iterable[SharedInput] = (),
    ) -> None:
        check_bytes("Chain", "tail_bytes", tail_bytes)
        regs = tuple(Region(**r) if isinstance(r, dict) else r for r in regions)
        if not regs:
            raise ValueError("Chain: regions must not be empty")
        seen: set[str] = set()
        for r in regs:
            if not isinstance(r, Region):
                raise TypeError(f"Chain: expected Region, got {type(r).__name__}")
            if r.name in seen:
                raise ValueError(f"Chain: duplicate region name {r.name!r}")
            seen.add(r.name)
        shared = tuple(SharedInput(**t) if isinstance(t, dict) else t for t in shared_inputs)
        for t in shared:
            if not isinstance(t, SharedInput):
                raise TypeError(f"Chain: expected SharedInput, got {type(t).__name__}")
            if t.takers and t.takers[-1] >= len(regs):
                raise ValueError(
                    f"Chain: a shared input's takers {t.takers!r} name regions beyond the "
                    f"chain's {len(regs)}"
                )
        object.__setattr__(self, "regions", regs)
        object.__setattr__(self, "tail_bytes", tail_bytes)
        object.__setattr__(self, "shared_inputs", shared)

    @property
    def shared_bytes(self) -> int:
        """The shared inputs' bytes: at most what is live of them in the forward."""
        return sum(t.nbytes for t in self.shared_inputs)

    def shared_bytes_in_forward(self, region: int) -> int:
        """The shared inputs live while region ``region`` runs forward: all but those a
        region at or after it makes."""
        return sum(t.nbytes for t in self.shared_inputs if t.made_by < region)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def forward_cost(self) -> float:
        """Total forward cost: the baseline that ``Plan.extra_cost`` is relative to."""
        return float(sum(r.fwd_cost for r in self.regions))

    def to_dict(self) -> dict[str, Any]:
        return {
            "regions": [asdict(r) for r in self.regions],
            "tail_bytes": self.tail_bytes,
            "shared_inputs": [asdict(t) for t in self.shared_inputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chain:
        regions = []
        for r in data["regions"]:
            opts = tuple(RegionOption(**o) for o in r.get("options", ()))
            regions.append(Region(**{**r, "options": opts}))
        shared = [SharedInput(**t) for t in data.get("shared_inputs", ())]
        return cls(regions, tail_bytes=data.get("tail_bytes", 0), shared_inputs=shared)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Chain:
        return cls.from_dict(json.loads(text))


def offload_cost(saved_bytes: int, fwd_seconds: float, host_bandwidth: float) -> float:
    """Seconds that offloading a region adds to the step, under a simple overlap model.

    The copies run on their own stream: out to the host while the region and the next
    regions run forward (their forward stands in as about the region's own), and back,
    all of the region's tensors once its backward starts, while its backward runs (about
    twice its forward). Only the transfer time that compute does not cover is paid:
    ``max(0, t - fwd) + max(0, t - 2 fwd)``, ``t`` the time to move ``saved_bytes``.
    """
    t = saved_bytes / host_bandwidth
    return max(0.0, t - fwd_seconds) + max(0.0, t - 2 * fwd_seconds)


def option_index(region: Region, name: str) -> int:
    """Index in ``region.menu()`` of the option called ``name``."""
    for k, o in enumerate(region.menu()):
        if o.name == name:
            return k
    valid = [o.name for o in region.menu()]
    why = f" (it {region.why_stored_only})" if region.why_stored_only else ""
    raise ValueError(f"region {region.name!r} has no option {name!r}; it has {valid}{why}")
