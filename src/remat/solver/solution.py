"""The planner's answer: ``Plan`` (one ``RegionPlan`` per region, and the multi-region
segments), with its JSON round-trip and its validation, and the table it prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from remat.errors import PlanError
from remat.solver.problem import ACTIONS, OFFLOAD, OPS, Action
from remat.solver.units import fmt_bytes, fmt_flops, fmt_seconds
from remat.solver.validation import check_bytes, check_cost

__all__ = ["Plan", "RegionPlan", "check_segments", "offloaded_in_segments"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionPlan:
    """What one region does.

    Attributes:
        name: the region's name.
        action: ``"store"``, ``"recompute"``, ``"ops"`` (save ``save_ops``, recompute the rest)
            or ``"offload"`` (what it saves goes to host memory until its backward).
        option: the name of the chosen ``RegionOption``.
        kept_bytes: bytes it holds from its forward to its backward.
        recompute_cost: forward work it redoes in its own backward (offload: the transfer
            time compute does not hide).
        save_ops: ops whose outputs are saved, for ``"ops"``.
        depth: how many checkpointed multi-region segments enclose it; each one runs the
            region's forward once more.
        engine: the op-level engine for ``"ops"`` (``RegionOption.engine``).
        note: why a stored region could not be checkpointed (``Region.store_only``).
    """

    name: str
    action: Action
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
            check_bytes(owner, "kept_bytes", self.kept_bytes)
            check_cost(owner, "recompute_cost", self.recompute_cost)
            check_bytes(owner, "depth", self.depth)
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
        """A plan from :meth:`to_dict`'s form (a loaded JSON file), or from the report
        ``remat plan --json`` writes (``{"plan": {...}, "step_peak_bytes": ..., "verify":
        ...}``): its ``"plan"``.

        Raises:
            PlanError: a field is missing, unknown or of the wrong kind (named).
        """
        if isinstance(data, dict) and "plan" in data and "regions" not in data:
            data = data["plan"]  # a report: the plan and what was measured of it
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
        """A plan from :meth:`to_json`'s text, or from the report ``remat plan --json``
        writes (:meth:`from_dict`).

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
        return self.table()

    def table(self, *, verbose: bool = False, width: int = 120) -> str:
        """The plan as a table: a header with the prediction, one row per region (runs of
        regions treated alike share a row), and a legend.

        Args:
            verbose: add each region's option name and the ops an op-level region keeps,
                one row per region, at any width.
            width: the widest line of the default table (region names are shortened).
        """
        seg_of: dict[int, list[str]] = {}
        for k, (a, b) in enumerate(self.segments):
            for i in range(a, b):
                seg_of.setdefault(i, []).append(f"S{k}")
        forward = self.forward_cost or 0.0
        header = ["#", "region", "treatment", "kept", "recompute"]
        header += ["option", "keeps"] if verbose else []
        header += ["segments"] if self.segments or any(r.note for r in self.regions) else []
        cells = []
        for i, r in enumerate(self.regions):
            row = [r.name, _treatment(r), fmt_bytes(r.kept_bytes)]
            row.append(_share(r.recompute_cost, forward) if r.recompute_cost else "-")
            row += [r.option, _keeps(r)] if verbose else []
            if "segments" in header:
                row.append(",".join(seg_of.get(i, ())) + (f"  ({r.note})" if r.note else ""))
            cells.append(row)
        rows = [header] + (_per_region(cells) if verbose else _runs_alike(cells))
        if not verbose:
            rows = _fitted(rows, width)
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        budget = "none" if self.budget_bytes is None else fmt_bytes(self.budget_bytes)
        lines[:0] = [
            f"Plan by {self.solver}: predicted peak {fmt_bytes(self.predicted_peak_bytes)} "
            f"(budget {budget}); recomputes {_share(self.extra_cost, forward)} of the forward",
            *_measured(self.extra_cost, forward, self.meta),
        ]
        lines.append("kept: held from the region's forward to its backward (1 MB = 10^6 B)")
        lines.append("recompute: the region's recomputation, as a share of the whole forward")
        if any(r.action == OPS for r in self.regions) and not verbose:
            lines.append("keep N op outputs: op-level, the rest recomputed (which: verbose)")
        if any(r.action == "offload" for r in self.regions):
            lines.append("offload: its recompute is the host transfer time compute does not hide")
        for k, (a, b) in enumerate(self.segments):
            lines.append(f"S{k}: regions {a}..{b - 1} checkpointed as one segment")
        return "\n".join(lines)


def _treatment(r: RegionPlan) -> str:
    """What the region does, in words: an op-level option by what it keeps."""
    if r.action != OPS:
        return r.action
    named = r.option if not re.fullmatch(r"ops\d+", r.option) else ""
    kept = named or f"keep {len(r.save_ops)} op output{'s' if len(r.save_ops) != 1 else ''}"
    return f"{kept} ({r.engine})"


def _per_region(cells: list[list[str]]) -> list[list[str]]:
    return [[str(i), *row] for i, row in enumerate(cells)]


def _runs_alike(cells: list[list[str]]) -> list[list[str]]:
    """Consecutive regions with the same row but their name share one row:
    ``0-30  model.layers.0-30``."""
    rows: list[list[str]] = []
    start = 0
    for i in range(1, len(cells) + 1):
        if i < len(cells) and cells[i][1:] == cells[start][1:]:
            continue
        first, last = cells[start][0], cells[i - 1][0]
        index = str(start) if i - 1 == start else f"{start}-{i - 1}"
        rows.append([index, first if i - 1 == start else _name_run(first, last), *cells[start][1:]])
        start = i
    return rows


def _name_run(first: str, last: str) -> str:
    """``model.layers.0``, ``model.layers.30`` -> ``model.layers.0-30``."""
    a, b = re.fullmatch(r"(.*?)(\d+)", first), re.fullmatch(r"(.*?)(\d+)", last)
    if a and b and a.group(1) == b.group(1):
        return f"{first}-{b.group(2)}"
    return f"{first} .. {last}"


def _fitted(rows: list[list[str]], width: int) -> list[list[str]]:
    """Shorten the region names (their middle) until the rows fit ``width``."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    if over <= 0:
        return rows
    room = max(12, widths[1] - over)
    return [[row[0], _shortened(row[1], room), *row[2:]] for row in rows]


def _shortened(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    keep = room - 3
    return text[: keep - keep // 2] + "..." + text[len(text) - keep // 2 :]


def _share(cost: float, forward: float) -> str:
    return f"{cost / forward:.1%}" if forward else f"{cost:g}"


def _measured(extra: float, forward: float, meta: dict[str, Any]) -> list[str]:
    """The costs in their unit, where they were measured: seconds (and the FLOPs counted)."""
    if meta.get("cost_unit") != "seconds":
        return []
    flops = meta.get("forward_flops")
    counted = f"; forward {fmt_flops(flops)}" if flops else ""
    how = f"predicted on {meta['target']}" if meta.get("target") else "measured"
    return [
        f"  {fmt_seconds(extra)} recomputed of a {fmt_seconds(forward)} forward ({how}{counted})"
    ]


def _short_op(name: str) -> str:
    """``aten.addmm.default#0`` -> ``addmm#0``; every scaled-dot-product attention kernel
    (``_scaled_dot_product_flash_attention_for_cpu``...) -> ``sdpa``."""
    op, sep, call = name.partition("#")
    parts = op.split(".")
    if parts[0] in ("aten", "prims") and len(parts) > 1:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == "default":
        parts = parts[:-1]
    if "scaled_dot_product" in parts[0]:
        parts = ["sdpa", *parts[1:]]
    return ".".join(parts) + sep + call


def _keeps(r: RegionPlan) -> str:
    """What a region keeps for backward, in words."""
    if r.action == OPS:
        return ", ".join(map(_short_op, r.save_ops)) or "input only"
    words = {"store": "all it saves", "recompute": "input only", "offload": "the rest on host"}
    return words.get(r.action, r.action)


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


def offloaded_in_segments(actions: Sequence[str], segments: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of regions offloaded inside a segment: a segment reruns its regions in
    backward, where nothing is offloaded, so no plan may do that."""
    inside = {i for a, b in segments for i in range(a, b)}
    return [i for i, action in enumerate(actions) if action == OFFLOAD and i in inside]
