"""``remat.fit``: the largest batch (or sequence) whose training step fits a device, and
what each usual checkpointing choice costs there.

Each candidate size is profiled for real (on meta for a target GPU, or measured on the
CPU), the job's state and the headroom taken off the device's memory, and four plans
predicted as :func:`remat.plan` predicts them: ``none`` (every region stores), ``full``
(every region recomputed), ``selective`` (every region keeps its matmul and attention
outputs, Korthikanti et al. 2022) and ``remat`` (the cheapest plan within the budget).
A size fits when remat's plan does: no plan of the chain keeps less. The search probes
where the margin (what the budget leaves the step beyond the least any plan keeps) is
predicted to cross zero, from the sizes probed so far (activations grow about linearly
with the batch), until the answer and the size after it are both profiled: the answer
fits and the next does not, each by its own profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.errors import BudgetError, PlanError
from remat.measure.storage import unique_storage_bytes
from remat.planner.device_budget import DeviceBudget, Headroom, default_headroom
from remat.planner.planning import plan, plan_from_choices
from remat.planner.sharding import shard_profile, sharded_state
from remat.planner.training_state import OPTIMIZER_STATE_BYTES, training_state
from remat.profiling.profile_data import Profile
from remat.profiling.profiler import profile as make_profile
from remat.solver.units import fmt_bytes, fmt_seconds
from remat.targets.devices import Target, get_target

__all__ = [
    "FitResult",
    "FitRow",
    "device_budget_for",
    "device_budget_lines",
    "fit",
    "least_step_peak",
]

PLANS = ("none", "full", "selective", "remat")

# What a factory returns: the model, its positional inputs, its keyword inputs (and,
# optionally, the loss of its output, in place of fit's loss_fn).
Built = tuple[Any, ...]


def least_step_peak(profile: Profile) -> int:
    """The lowest training-step peak (new bytes) any plan of ``profile`` reaches."""
    try:
        plan(profile, 1)
    except BudgetError as err:
        if err.min_feasible_bytes is not None:
            return err.min_feasible_bytes
        raise
    return 1  # unreachable: no step peaks at one byte


def device_budget_for(
    model: nn.Module,
    inputs: Any,
    profile: Profile,
    optimizer: str,
    world_size: int,
    device_bytes: int,
    *,
    headroom: Headroom,
) -> DeviceBudget:
    """``device_bytes`` shared between the job's state (``optimizer``'s, sharded over
    ``world_size`` FSDP ranks, each of ``profile``'s regions a unit), the batch
    (``inputs``: any tree of tensors), ``headroom`` and the step."""
    return DeviceBudget(
        device_bytes=device_bytes,
        headroom=headroom,
        resident_bytes=_state(model, profile, optimizer, world_size).total + _inputs(inputs),
        ranks="rank" if world_size > 1 else "device",
    )


def device_budget_lines(
    workload: Any, profile: Profile, optimizer: str, world_size: int
) -> list[str]:
    """What the job's state is made of, as :func:`device_budget_for` counts it."""
    state = _state(workload.model, profile, optimizer, world_size)
    return state.describe(_inputs(workload.tensors)).splitlines()


def _state(model: nn.Module, profile: Profile, optimizer: str, world_size: int) -> Any:
    state = training_state(model, optimizer)
    if world_size > 1:
        return sharded_state(state, model, [r.name for r in profile.regions], world_size)
    return state


def _inputs(inputs: Any) -> int:
    return unique_storage_bytes(t for t in tree_leaves(inputs) if isinstance(t, Tensor))


@dataclass(frozen=True)
class FitRow:
    """One plan at one size.

    Attributes:
        batch: the batch size.
        seq_len: the sequence length (``None``: the factory takes none).
        plan: ``"none"``, ``"full"``, ``"selective"`` or ``"remat"``.
        peak_bytes: the predicted peak per rank (the step's peak on top of the state and
            the batch; the headroom is not in it); ``None``: no such plan (``note`` says why).
        fits: the peak plus the headroom is within the device's memory.
        step_seconds: the predicted (or measured) step time: the forward, twice that for
            the backward, and the recomputation.
        tokens_per_second: ``batch * seq_len * world_size / step_seconds`` (``None``
            without a sequence length).
        note: why a plan is missing (``remat`` finds none within the budget).
    """

    batch: int
    seq_len: int | None
    plan: str
    peak_bytes: int | None
    fits: bool
    step_seconds: float | None
    tokens_per_second: float | None
    note: str = ""


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` found.

    Attributes:
        best: remat's plan at the largest size that fits (``None``: none does).
        rows: every plan at every size profiled, in the order profiled.
        searched: ``"batch"`` or ``"seq_len"``.
        device_bytes: the device's memory per rank.
        headroom_bytes: kept free of it.
        world_size: FSDP ranks.
        plans: remat's :class:`~remat.solver.Plan` per size profiled, keyed by
            ``(batch, seq_len)``.
        smallest: at the smallest size, what the state and the batch take per rank, and
            the least peak per rank any plan reaches (why nothing fits, when nothing does).
    """

    best: FitRow | None
    rows: tuple[FitRow, ...]
    searched: str
    device_bytes: int
    headroom_bytes: int
    world_size: int
    plans: dict[tuple[int, int | None], Any] = field(default_factory=dict, repr=False)
    smallest: tuple[int, int] | None = None

    def table(self) -> str:
        """The rows as a table of at most 100 columns, then the answer."""
        header = ["batch", "seq", "plan", "peak/rank", "fits", "step", "tokens/s", ""]
        rows = [header]
        for r in sorted(self.rows, key=lambda r: (r.batch, r.seq_len or 0, PLANS.index(r.plan))):
            rows.append(
                [
                    str(r.batch),
                    "-" if r.seq_len is None else str(r.seq_len),
                    r.plan,
                    "-" if r.peak_bytes is None else fmt_bytes(r.peak_bytes),
                    "yes" if r.fits else "no",
                    "-" if r.step_seconds is None else fmt_seconds(r.step_seconds),
                    "-" if r.tokens_per_second is None else f"{r.tokens_per_second:,.0f}",
                    r.note,
                ]
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(
            f"peak/rank: the step's predicted peak on top of the state and the batch; fits: "
            f"within {fmt_bytes(self.device_bytes)} less {fmt_bytes(self.headroom_bytes)} headroom"
        )
        lines.append(self.answer())
        return "\n".join(lines)

    def answer(self) -> str:
        if self.best is None:
            usable = fmt_bytes(self.device_bytes - self.headroom_bytes)
            if self.smallest is None:
                return f"nothing fits: not even the smallest {self.searched} profiled"
            state, least = self.smallest
            if state > self.device_bytes - self.headroom_bytes:
                return (
                    f"nothing fits: the state and the batch alone take {fmt_bytes(state)} per "
                    f"rank of the {usable} usable (more ranks shard the state)"
                )
            return (
                f"nothing fits: at the smallest {self.searched} the least any plan keeps is "
                f"{fmt_bytes(least)} per rank of the {usable} usable"
            )
        b = self.best
        size = f"batch {b.batch}" + ("" if b.seq_len is None else f" x {b.seq_len} tokens")
        speed = (
            f", {b.tokens_per_second:,.0f} tokens/s"
            + (f" over {self.world_size} ranks" if self.world_size > 1 else "")
            if b.tokens_per_second
            else ""
        )
        text = (
            f"largest that fits: {size} with remat's plan "
            f"({fmt_bytes(b.peak_bytes or 0)} per rank{speed})"
        )
        fitting = [r for r in self.rows if r.fits and r.tokens_per_second]
        fastest = max(fitting, key=lambda r: r.tokens_per_second or 0, default=None)
        if fastest is not None and (fastest.tokens_per_second or 0) > (b.tokens_per_second or 0):
            text += (
                f"\nmost tokens/s: batch {fastest.batch} x {fastest.seq_len} with "
                f"{fastest.plan} ({fastest.tokens_per_second:,.0f} tokens/s): recomputing less "
                "at a smaller size"
            )
        return text

    def __str__(self) -> str:
        return self.table()


def fit(
    build: Callable[[int, int | None], Built],
    *,
    target: str | Target | None = None,
    device_bytes: int | None = None,
    optimizer: str = "adamw",
    world_size: int = 1,
    headroom: int | Headroom | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    max_size: int = 1 << 17,
    progress: Callable[[str], None] | None = None,
) -> FitResult:
    """The largest batch (or sequence length) whose training step fits the device with
    remat's plan, and the usual plans (none, full, selective) at each size profiled.

    Args:
        build: ``build(batch, seq_len) -> (model, inputs, kwargs)`` (or ``(model, inputs,
            kwargs, loss_fn)``): a fresh model in train mode and one step's inputs (on
            meta, with ``target``, nothing is allocated).
        target: the device planned for (``"h100"``...): costs are its predicted seconds and
            ``device_bytes`` defaults to its memory. ``None``: measured on the model's device.
        device_bytes: the memory per rank (default: the target's).
        optimizer: counted in the state (a key of ``OPTIMIZER_STATE_BYTES``).
        world_size: FSDP ranks; the state is sharded over them.
        headroom: kept free (default: ``default_headroom``: on a GPU the CUDA context,
            NCCL and 5% for the allocator; 0 on the CPU).
        batch: the batch size, or ``None`` to search it at ``seq_len``; given with
            ``seq_len=None``, the sequence length is searched instead, in multiples of
            128; both given, that one size only.
        seq_len: the sequence length handed to ``build`` (``None``: searched, or none).
        loss_fn: model output -> scalar loss (default: as :func:`remat.profile`).
        max_size: the search stops there.
        progress: called with a line per size profiled.

    Raises:
        ValueError: a wrong value (optimizer, world size, sizes, no device memory known).
        PlanError: a model the profile cannot plan.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    memory = device_bytes if device_bytes is not None else (tgt.memory_bytes if tgt else None)
    _check_fit(optimizer, world_size, memory, batch, seq_len, max_size)
    assert memory is not None  # _check_fit says so
    first_room = Headroom(headroom) if isinstance(headroom, int) else headroom
    if first_room is None and tgt is not None:
        first_room = default_headroom(tgt, "meta", world_size)
    if first_room is not None and first_room.of(memory) >= memory:
        raise ValueError(
            f"remat.fit: a headroom of {fmt_bytes(first_room.of(memory))} leaves nothing of "
            f"device_bytes={memory:,}; give more memory or headroom=0"
        )
    searched = "seq_len" if batch is not None and seq_len is None else "batch"
    rows: list[FitRow] = []
    plans: dict[tuple[int, int | None], Any] = {}
    state = {"headroom": first_room}  # None: the model's device says (no target)

    room: dict[int, int] = {}

    def margin_at(size: int) -> int:
        b, s = (batch, size) if searched == "seq_len" else (size, seq_len)
        new, chosen, headroom_used, margin, room[size] = _candidate(
            build, b or 1, s, tgt, memory, optimizer, world_size, state, loss_fn
        )
        rows.extend(new)
        plans[(b or 1, s)] = chosen
        state["headroom"] = headroom_used
        if progress is not None:
            progress(f"{searched} {size}: " + ("fits" if margin >= 0 else "does not fit"))
        return margin

    if batch is not None and seq_len is not None:
        largest = batch if margin_at(batch) >= 0 else None
    elif searched == "seq_len":  # sequences stay multiples of the first
        largest = _largest(margin_at, 128, max_size, 128, room)
    else:
        largest = _largest(margin_at, 1, max_size, 1, room)
    best = next((r for r in rows if r.plan == "remat" and _size(r, searched) == largest), None)
    return FitResult(
        best=best,
        rows=tuple(rows),
        searched=searched,
        device_bytes=memory,
        headroom_bytes=state["headroom"].of(memory) if state["headroom"] else 0,
        world_size=world_size,
        plans=plans,
        smallest=state.get("smallest"),
    )


def _size(row: FitRow, searched: str) -> int | None:
    return row.seq_len if searched == "seq_len" else row.batch


def _largest(
    margin_at: Callable[[int], int], first: int, last: int, step: int, room: dict[int, int]
) -> int | None:
    """The largest size in ``first..last`` (multiples of ``step``) whose margin (the bytes
    the budget leaves the step beyond the least any plan keeps) is not negative. Margins
    fall with the size, about linearly: each probe is where the line through the two
    probes nearest the answer crosses zero, the first line drawn through size 0 with
    nothing kept (``room``: the budget left to the step at each size probed), so a few
    profiles find it, and the size after the answer is always probed."""
    margins = {first: margin_at(first)}
    if margins[first] < 0:
        return None
    margins[0] = room[first]  # the line's other end until a second size is probed
    good, bad = first, None
    while (bad is None and good < last) or (bad is not None and bad - good > step):
        size = _next_probe(margins, good, bad, step, last)
        margins[size] = margin_at(size)
        if margins[size] >= 0:
            good = size
        else:
            bad = size
    return good


def _next_probe(margins: dict[int, int], good: int, bad: int | None, step: int, last: int) -> int:
    """Where the margin's line crosses zero, rounded down to a multiple of ``step``, kept
    strictly between ``good`` and ``bad`` (at most ``last``)."""
    goods = sorted(x for x, m in margins.items() if m >= 0)
    other = bad if bad is not None else (goods[-2] if len(goods) > 1 else None)
    size = 2 * good
    if other is not None and margins[other] != margins[good]:
        slope = (margins[other] - margins[good]) / (other - good)
        if slope < 0:
            size = int(good + margins[good] / -slope) // step * step
    upper = min(last, bad - step if bad is not None else last)
    return max(good + step, min(size, upper))


def _candidate(
    build: Callable[[int, int | None], Built],
    batch: int,
    seq_len: int | None,
    target: Target | None,
    memory: int,
    optimizer: str,
    world_size: int,
    state: dict[str, Any],
    loss_fn: Callable[[Any], Tensor] | None,
) -> tuple[list[FitRow], Any, Headroom, int, int]:
    """Profile one size and predict its four plans: the rows, remat's plan (``None``: none
    fits), the headroom used, the margin: what the budget leaves the step beyond the
    least any plan keeps (negative: nothing fits), and what it leaves the step."""
    built = build(batch, seq_len)
    model, inputs, kwargs = built[:3]
    loss_of = built[3] if len(built) > 3 else loss_fn
    # one timed forward: a search profiles many sizes, and only their bytes decide
    whole = make_profile(model, *inputs, loss_fn=loss_of, target_device=target, repeats=1, **kwargs)
    prof = shard_profile(whole, model, world_size)
    room = state["headroom"]
    if room is None:
        device = str(next((p.device for p in model.parameters()), "cpu"))
        room = default_headroom(target, device, world_size)
    budget = device_budget_for(
        model, (inputs, kwargs), prof, optimizer, world_size, memory, headroom=room
    )
    n = len(prof.regions)
    tokens = batch * seq_len * world_size if seq_len is not None else None
    rows, chosen = [], None
    for name in PLANS:
        try:
            p = _plan_named(prof, name, n, budget)
        except (BudgetError, PlanError, ValueError) as err:
            note = "no plan fits" if isinstance(err, BudgetError) else str(err)[:60]
            rows.append(FitRow(batch, seq_len, name, None, False, None, None, note))
            continue
        if name == "remat":
            chosen = p
        seconds = _step_seconds(prof, p)
        peak = budget.total_for(p.predicted_peak_bytes)
        rows.append(
            FitRow(
                batch,
                seq_len,
                name,
                peak,
                peak + budget.headroom_bytes <= memory,
                seconds,
                tokens / seconds if tokens and seconds else None,
            )
        )
    least = least_step_peak(prof)
    state.setdefault("smallest", (budget.resident_bytes, budget.total_for(least)))
    return rows, chosen, room, budget.step_bytes - least, budget.step_bytes


def _plan_named(prof: Profile, name: str, n: int, budget: DeviceBudget) -> Any:
    if name == "remat":
        if budget.step_bytes < 1:
            raise BudgetError("the state and headroom alone exceed the device")
        return plan(prof, budget.step_bytes)
    choice = {"none": "store", "full": "recompute", "selective": "save-matmuls"}[name]
    return plan_from_choices(prof, [choice] * n, every_preset=True)


def _step_seconds(prof: Profile, p: Any) -> float | None:
    if prof.cost_unit != "seconds":
        return None
    # The backward taken as twice the forward: a matmul's backward is two matmuls.
    return 3 * p.forward_cost + p.extra_cost


def _check_fit(
    optimizer: str,
    world_size: int,
    memory: int | None,
    batch: int | None,
    seq_len: int | None,
    max_size: int,
) -> None:
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(
            f"remat.fit: optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}"
        )
    for name, value in (("world_size", world_size), ("max_size", max_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"remat.fit: {name} must be a positive int, got {value!r}")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"remat.fit: {name} must be a positive int or None, got {value!r}")
    if memory is None or memory < 1:
        raise ValueError(
            "remat.fit: give device_bytes (the memory per rank) or a target (target='h100')"
        )
