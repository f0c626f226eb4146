"""The planner's data: the problem (``Region``, ``Chain``) and its answer (``Plan``).

Everything here is plain data with a JSON round-trip and no reference to torch modules, so a
profile taken on one machine can be planned on another and a plan can be reviewed before it is
applied. The memory model that gives a plan its predicted peak lives in ``planner/chain.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from remat.errors import PlanError

__all__ = ["ACTIONS", "Chain", "Plan", "Region", "RegionOption", "RegionPlan"]

# What a region does with its activations between its forward and its backward.
STORE, RECOMPUTE, OPS, OFFLOAD = "store", "recompute", "ops", "offload"
ACTIONS = (STORE, RECOMPUTE, OPS, OFFLOAD)  # offload is reserved: no solver emits it yet


def _check_bytes(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative int of bytes, got {value!r}")


def _check_cost(owner: str, name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite non-negative number, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionOption:
    """One way to keep a region's activations: save some of them, recompute the rest.

    Attributes:
        name: unique within the region; ``"store"`` and ``"recompute"`` are the built-ins.
        kept_bytes: bytes held from the region's forward until its backward, the region's
            input included (store: ``saved_bytes``; recompute: ``input_bytes``).
        recompute_cost: forward work redone in backward (store: 0; recompute: the region's
            ``rerun_cost``).
        save_ops: names of the ops whose outputs are saved (op-level options only).
        kind: ``"store"``, ``"recompute"`` or ``"ops"`` (an op-level mix of the two).
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
    kind: str = OPS
    backward_extra_bytes: int = 0
    engine: str = "replay"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RegionOption: name must be a non-empty str, got {self.name!r}")
        _check_bytes(f"option {self.name!r}", "kept_bytes", self.kept_bytes)
        _check_cost(f"option {self.name!r}", "recompute_cost", self.recompute_cost)
        _check_bytes(f"option {self.name!r}", "backward_extra_bytes", self.backward_extra_bytes)
        if self.kind not in (STORE, RECOMPUTE, OPS):
            raise ValueError(f"option {self.name!r}: kind must be store/recompute/ops")
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
        transient_bytes: any further peak while the region runs forward or backward
            (workspace, its input's gradient being produced).
        options: op-level options between store and recompute (see ``planner.ops``).
        input_saved: whether autograd saves the region's input (the region itself, or the
            region before it saving its output). ``False`` for a ReLU after a Linear: the ReLU
            keeps its output, and the Linear's output is freed once the ReLU has run, unless a
            checkpoint holds it. Then ``saved_bytes`` leaves the input out.
        forward_transient_bytes: the part of ``transient_bytes`` reached in the forward
            (``None``: all of it). Gradients in flight and parameter gradients piling up
            exist only in the backward.
        recompute_cost: what recomputing the region alone redoes (``None``: ``fwd_cost``).
            Less than ``fwd_cost`` when its backward needs nothing from its last ops: the
            recomputation stops once the last needed tensor is back (early stop), so a
            block ending in a Linear and a residual add never reruns them.
        store_only: why the region cannot be recomputed from its input (``""``: it can).
            A region that writes its input in place (``nn.ReLU(inplace=True)`` on its own)
            is never recomputed alone and never starts a segment; inside a segment it is
            fine (its input is recomputed, and the write with it), and its op-level options
            run on the tape. Plan tables say why.
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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Region: name must be a non-empty str, got {self.name!r}")
        owner = f"region {self.name!r}"
        if not isinstance(self.store_only, str):
            raise ValueError(f"{owner}: store_only must be a str, got {self.store_only!r}")

        _check_cost(owner, "fwd_cost", self.fwd_cost)
        if self.recompute_cost is not None:
            _check_cost(owner, "recompute_cost", self.recompute_cost)
            if self.recompute_cost > self.fwd_cost:
                raise ValueError(
                    f"{owner}: recompute_cost ({self.recompute_cost}) is more than the forward "
                    f"it reruns (fwd_cost={self.fwd_cost})"
                )
        for attr in ("input_bytes", "saved_bytes", "output_bytes", "transient_bytes"):
            _check_bytes(owner, attr, getattr(self, attr))
        if self.forward_transient_bytes is not None:
            _check_bytes(owner, "forward_transient_bytes", self.forward_transient_bytes)
        if not isinstance(self.input_saved, bool):
            raise ValueError(f"{owner}: input_saved must be a bool, got {self.input_saved!r}")
        if self.input_saved and self.saved_bytes < self.input_bytes:
            raise ValueError(
                f"{owner}: saved_bytes ({self.saved_bytes}) must count the input "
                f"(input_bytes={self.input_bytes}), so saved_bytes >= input_bytes"
            )
        opts = tuple(RegionOption(**o) if isinstance(o, dict) else o for o in self.options)
        names = {STORE, RECOMPUTE}
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
    def saved_with_input_bytes(self) -> int:
        """What a checkpoint of this region that saved every op would keep: its saved
        activations and its input (which the checkpoint holds)."""
        return self.saved_bytes + (0 if self.input_saved else self.input_bytes)

    @property
    def rerun_cost(self) -> float:
        """The cost of its ``recompute`` option: ``recompute_cost``, else ``fwd_cost``."""
        return self.fwd_cost if self.recompute_cost is None else self.recompute_cost

    @property
    def backward_bytes(self) -> int:
        """Bytes live for this region while it runs backward, its input aside when nothing
        saves it (``input_saved=False``): then a checkpoint holding it adds it."""
        return self.saved_bytes + self.output_bytes + self.transient_bytes

    def menu(self) -> tuple[RegionOption, ...]:
        """Store, recompute, then the op-level options (no recompute if ``store_only``)."""
        store = RegionOption(name=STORE, kept_bytes=self.saved_bytes, recompute_cost=0, kind=STORE)
        if self.store_only:
            return (store, *self.options)
        recompute = RegionOption(
            name=RECOMPUTE,
            kept_bytes=self.input_bytes,
            recompute_cost=self.rerun_cost,
            kind=RECOMPUTE,
        )
        return (store, recompute, *self.options)


@dataclass(frozen=True, slots=True, init=False)
class Chain:
    """A chain of regions run one after the other: the planner's problem.

    ``tail_bytes``: what the rest of the model (a head, the loss) adds, between the chain's
    forward and its backward, on top of everything the chain holds then: the peak of an LM
    head's logits and their gradient sits on top of every block's kept activations.

    Example:
        >>> Chain([Region(name="a", fwd_cost=1, input_bytes=4, saved_bytes=8, output_bytes=4)])
    """

    regions: tuple[Region, ...]
    tail_bytes: int = 0

    def __init__(self, regions: Iterable[Region], tail_bytes: int = 0) -> None:
        _check_bytes("Chain", "tail_bytes", tail_bytes)
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
        object.__setattr__(self, "regions", regs)
        object.__setattr__(self, "tail_bytes", tail_bytes)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def forward_cost(self) -> float:
        """Total forward cost: the baseline that ``Plan.extra_cost`` is relative to."""
        return float(sum(r.fwd_cost for r in self.regions))

    def to_dict(self) -> dict[str, Any]:
        return {"regions": [asdict(r) for r in self.regions], "tail_bytes": self.tail_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chain:
        regions = []
        for r in data["regions"]:
            opts = tuple(RegionOption(**o) for o in r.get("options", ()))
            regions.append(Region(**{**r, "options": opts}))
        return cls(regions, tail_bytes=data.get("tail_bytes", 0))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Chain:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionPlan:
    """What one region does.

    Attributes:
        name: the region's name.
        action: ``"store"``, ``"recompute"``, ``"ops"`` (save ``save_ops``, recompute the rest)
            or ``"offload"`` (reserved).
        option: the name of the chosen ``RegionOption``.
        kept_bytes: bytes it holds from its forward to its backward.
        recompute_cost: forward work it redoes in its own backward.
        save_ops: ops whose outputs are saved, for ``"ops"``.
        depth: how many checkpointed multi-region segments enclose it; each one runs the
            region's forward once more.
        engine: the op-level engine for ``"ops"`` (``RegionOption.engine``).
        note: why a stored region could not be checkpointed (``Region.store_only``).
    """

    name: str
    action: str
    option: str
    kept_bytes: int
    recompute_cost: float
    save_ops: tuple[str, ...] = ()
    depth: int = 0
    engine: str = "replay"
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"Plan region: name must be a non-empty str, got {self.name!r}")
        owner = f"Plan region {self.name!r}"
        if self.action not in ACTIONS:
            raise PlanError(f"{owner}: action must be one of {ACTIONS}, got {self.action!r}")
        if self.engine not in ("replay", "tape"):
            raise PlanError(f"{owner}: engine must be 'replay' or 'tape', got {self.engine!r}")
        for name in ("option", "note"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"{owner}: {name} must be a str, got {getattr(self, name)!r}")
        try:
            _check_bytes(owner, "kept_bytes", self.kept_bytes)
            _check_cost(owner, "recompute_cost", self.recompute_cost)
            _check_bytes(owner, "depth", self.depth)
        except ValueError as err:
            raise PlanError(str(err)) from None
        if isinstance(self.save_ops, str) or not all(isinstance(o, str) for o in self.save_ops):
            raise PlanError(f"{owner}: save_ops must be a list of op names, got {self.save_ops!r}")
        object.__setattr__(self, "save_ops", tuple(self.save_ops))


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A checkpointing plan for a chain and its prediction under the memory model.

    Attributes:
        regions: one ``RegionPlan`` per region, in chain order.
        segments: ``(start, stop)`` region ranges (stop exclusive, at least two regions) that
            are checkpointed as one unit: only the first region's input is kept, and in
            backward the segment is rerun following the inner regions' own plans (segments
            may nest, Rotor-style).
        predicted_peak_bytes: the peak the memory model predicts.
        extra_cost: forward work recomputed, in the chain's cost unit.
        forward_cost: the chain's total forward cost (``extra_cost / forward_cost`` is the
            relative overhead on the forward).
        budget_bytes: the budget planned for (``None`` for frontier points).
        solver: which solver made it.
        resolution_bytes: the memory resolution the solver worked at (``None``: exact).
        meta: free-form notes for later stages (e.g. the profile it came from); not
            compared.
    """

    regions: tuple[RegionPlan, ...]
    segments: tuple[tuple[int, int], ...] = ()
    predicted_peak_bytes: int
    extra_cost: float
    forward_cost: float
    budget_bytes: int | None
    solver: str
    resolution_bytes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PlanError(f"Plan: regions {repeated} appear more than once")
        try:
            segments = check_segments(len(self.regions), self.segments)
        except (TypeError, ValueError) as err:
            raise PlanError(f"Plan: {err} (the plan has {len(self.regions)} regions)") from None
        object.__setattr__(self, "segments", segments)

    def apply(self, model: Any) -> Any:
        """Apply this plan to ``model`` in place (``remat.apply_plan``) and return it."""
        from remat.planner.autoplanning import apply_plan

        return apply_plan(model, self)

    @property
    def choices(self) -> tuple[str, ...]:
        """The option name of each region."""
        return tuple(r.option for r in self.regions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = [list(s) for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A plan from :meth:`to_dict`'s form (a loaded JSON file).

        Raises:
            PlanError: a field is missing, unknown or of the wrong kind (named).
        """
        _check_fields(data, "plan", _PLAN_FIELDS, _PLAN_REQUIRED)
        if not isinstance(data["regions"], list) or not data["regions"]:
            raise PlanError(f"plan: 'regions' must be a non-empty list, got {data['regions']!r}")
        regions = []
        for i, r in enumerate(data["regions"]):
            _check_fields(r, f"plan: regions[{i}]", _REGION_FIELDS, _REGION_REQUIRED)
            regions.append(RegionPlan(**r))
        segments = data.get("segments", [])
        if not isinstance(segments, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(_is_int(x) for x in s) for s in segments
        ):
            raise PlanError(f"plan: 'segments' must be a list of [start, stop], got {segments!r}")
        for name in ("predicted_peak_bytes", "extra_cost", "forward_cost"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlanError(f"plan: {name!r} must be a number, got {value!r}")
        if not isinstance(data.get("meta", {}), dict):
            raise PlanError(f"plan: 'meta' must be an object, got {data['meta']!r}")
        return cls(**{**data, "regions": tuple(regions), "segments": tuple(map(tuple, segments))})

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan from :meth:`to_json`'s text.

        Raises:
            PlanError: the text is not JSON, or a field is missing, unknown or of the wrong
                kind (named).
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise PlanError(f"plan: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        seg_of: dict[int, list[str]] = {}
        for k, (a, b) in enumerate(self.segments):
            for i in range(a, b):
                seg_of.setdefault(i, []).append(f"S{k}")
        rows = [("#", "region", "action", "option", "kept", "recompute", "segments")]
        for i, r in enumerate(self.regions):
            rows.append(
                (
                    str(i),
                    r.name,
                    f"ops ({r.engine})" if r.action == OPS else r.action,
                    r.option,
                    _fmt_bytes(r.kept_bytes),
                    f"{r.recompute_cost:g}",
                    ",".join(seg_of.get(i, ())) + (f"  ({r.note})" if r.note else ""),
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        budget = "none" if self.budget_bytes is None else _fmt_bytes(self.budget_bytes)
        ratio = self.extra_cost / self.forward_cost if self.forward_cost else 0.0
        lines.insert(
            0,
            f"Plan by {self.solver}: predicted peak {_fmt_bytes(self.predicted_peak_bytes)} "
            f"(budget {budget}), extra cost {self.extra_cost:g} "
            f"({ratio:.1%} of the forward)",
        )
        for k, (a, b) in enumerate(self.segments):
            lines.append(f"S{k}: regions {a}..{b - 1} checkpointed as one segment")
        return "\n".join(lines)


_PLAN_FIELDS = (
    "regions",
    "segments",
    "predicted_peak_bytes",
    "extra_cost",
    "forward_cost",
    "budget_bytes",
    "solver",
    "resolution_bytes",
    "meta",
)
_PLAN_REQUIRED = ("regions", "predicted_peak_bytes", "extra_cost", "forward_cost", "solver")
_REGION_FIELDS = (
    "name",
    "action",
    "option",
    "kept_bytes",
    "recompute_cost",
    "save_ops",
    "depth",
    "engine",
    "note",
)
_REGION_REQUIRED = ("name", "action", "option", "kept_bytes", "recompute_cost")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fields(data: Any, what: str, fields: Sequence[str], required: Sequence[str]) -> None:
    """Raise ``PlanError`` naming what is wrong with a JSON object's keys."""
    if not isinstance(data, dict):
        raise PlanError(
            f"{what} must be a JSON object with {', '.join(map(repr, required))}, got "
            f"{type(data).__name__} {str(data)[:40]}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise PlanError(f"{what}: missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(
            f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; its fields are "
            f"{', '.join(fields)}"
        )


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def option_index(region: Region, name: str) -> int:
    """Index in ``region.menu()`` of the option called ``name``."""
    for k, o in enumerate(region.menu()):
        if o.name == name:
            return k
    valid = [o.name for o in region.menu()]
    raise ValueError(f"region {region.name!r} has no option {name!r}; it has {valid}")


def check_segments(n: int, segments: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Validate multi-region segments: in range, two regions or more, properly nested, each
    once (a segment listed twice would run its blocks twice)."""
    pairs = [(int(a), int(b)) for a, b in segments]
    twice = sorted({p for p in pairs if pairs.count(p) > 1})
    if twice:
        raise ValueError(f"segments: {twice} listed more than once")
    segs = sorted(pairs, key=lambda s: (s[0], -s[1]))
    for a, b in segs:
        if not 0 <= a < b <= n or b - a < 2:
            raise ValueError(
                f"segments: ({a}, {b}) must satisfy 0 <= start, start + 2 <= stop <= {n}"
            )
    for i, (a, b) in enumerate(segs):
        for c, d in segs[i + 1 :]:
            if c < b < d:
                raise ValueError(f"segments: ({a}, {b}) and ({c}, {d}) overlap without nesting")
    return tuple(segs)
