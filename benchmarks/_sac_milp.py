"""PyTorch's own SAC planner (``torch.distributed._tools``: SAC estimator + ``sac_milp``) on CPU.

Used by ``benchmarks/planner.py`` as a ``sac_milp:<budget>`` baseline. The pipeline is the one
of PyTorch's ``test/distributed/_tools/test_sac_ilp.py``, unchanged: under ``FakeTensorMode``,
``MemTracker`` records per-module memory, ``RuntimeEstimator`` the module order and times,
``SACEstimator`` each block's ops (memory, time, greedy order, piecewise-linear trade-off);
``aggregate_stats`` + ``parse_module_info`` make the module graph, ``sac_milp`` chooses which
blocks to checkpoint and what fraction of their activation memory to discard, and
``get_optimal_checkpointing_policy_per_module`` turns each fraction into a per-op save list.

Why an adapter is needed on CPU (torch 2.13):

- ``operator-level-cost-model`` (the roofline model) refuses to run without CUDA:
  ``runtime_estimator.py:236-239`` raises ``AssertionError("Roofline estimation needs to access
  CUDA capabilities to make estimations")``; its peak FLOP/s and bandwidth are GPU figures.
- ``operator-level-benchmark`` runs each op on real tensors but times it with CUDA events
  (``runtime_estimator.py:144-151``: ``torch.cuda.Event``, ``current_stream``, ``synchronize``);
  on a CPU-only build ``torch.cuda.Event(enable_timing=True)`` raises ``RuntimeError("Tried to
  instantiate dummy base class Event")`` (``torch/_utils.py:1034``), and with CUDA present it
  would time an idle stream, not the CPU kernels.

:func:`_cpu_op_timer` supplies, only while the estimators run, CPU stand-ins for those three
calls (``time.perf_counter`` marks; CPU kernels are synchronous, so ``synchronize`` has nothing
to wait for). The estimators' algorithms run unchanged and every time they use is a real CPU
measurement (2 warm-up and 3 timed runs per op, as PyTorch does). ``MemTracker``,
``SACEstimator``'s byte counts and both MILPs are device-neutral (``pulp``'s bundled CBC solves
them; ``pwlf`` fits the trade-off curves), so nothing else is changed.

Two CPU notes: PyTorch exempts only the CUDA flash kernel from SAC's random-op rule
(``sac_estimator.py:435``), so the CPU ``_scaled_dot_product_flash_attention_for_cpu`` (tagged
``nondeterministic_seeded``) counts as a random op; with one attention per block that only
keeps it out of a group, and without dropout its recomputation is exact. Budgets here are
fractions of the un-checkpointed step peak predicted by PyTorch's model
(``get_peak_memory_runtime_baseline``), parameters excluded, like remat's ``"40%"``.

Needs ``pulp`` and ``pwlf`` (``pip install pulp pwlf``). Run:
``python benchmarks/_sac_milp.py [--layers 12] [--budgets 0.6,0.4,0.25]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import nn

from remat.bench.workloads import Workload

__all__ = [
    "SacMilpPlan",
    "SacMilpStats",
    "apply_sac_milp",
    "sac_milp_plan",
    "sac_milp_policies",
    "sac_milp_stats",
]


@dataclass(kw_only=True, slots=True)
class SacMilpPlan:
    """What PyTorch's SAC planner decided for one budget.

    Attributes:
        budget_fraction: the budget, as a fraction of ``baseline_peak_bytes``.
        budget_bytes: the budget in bytes, parameters excluded (``sac_milp`` counts them, so it
            is given this plus the parameter bytes).
        discard: block name (as in ``Workload.blocks``) -> fraction of its activation memory
            to discard; blocks not listed are not checkpointed.
        save: block name -> per-op decisions, 1 = save, 0 = recompute, in the order of
            ``op_names`` (ops that SAC ignores, e.g. ``detach``, ``clone``, are left out).
        op_names: block name -> the op names the estimator saw, to check against at run time.
        predicted_peak_bytes: ``sac_milp``'s upper bound on the step peak, parameters excluded.
        predicted_recompute_ms: ``sac_milp``'s objective, recomputation time in ms (CPU).
        baseline_peak_bytes: PyTorch's predicted un-checkpointed step peak, parameters excluded.
        baseline_compute_ms: PyTorch's estimated forward + backward time in ms (CPU).
        seconds: wall time of this planning: the MILPs, plus the estimators when run here.
    """

    budget_fraction: float
    budget_bytes: int
    discard: dict[str, float] = field(default_factory=dict)
    save: dict[str, list[int]] = field(default_factory=dict)
    op_names: dict[str, list[str]] = field(default_factory=dict)
    predicted_peak_bytes: int = -1
    predicted_recompute_ms: float = 0.0
    baseline_peak_bytes: int = 0
    baseline_compute_ms: float = 0.0
    seconds: float = 0.0


class _CpuEvent:
    """``torch.cuda.Event`` stand-in: ``record`` marks the CPU clock, ``elapsed_time`` in ms."""

    def __init__(self, enable_timing: bool = False, **_: object) -> None:
        self.t = 0.0

    def record(self, stream: object = None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.t - self.t) * 1e3


@contextlib.contextmanager
def _cpu_op_timer() -> Iterator[None]:
    """Let ``RuntimeEstimator._maybe_run_and_benchmark_fallback_kernel`` time CPU kernels.

    It times with ``torch.cuda.Event`` (torch 2.13 ``runtime_estimator.py:144-151``), which a
    CPU-only build cannot create; CPU kernels return when done, so wall-clock marks around
    them measure the same thing.
    """
    with (
        mock.patch.object(torch.cuda, "Event", _CpuEvent),
        mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: None),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
    ):
        yield


def _fake_copy(workload: Workload, fake_mode) -> Workload:
    """The workload with every parameter, buffer, input and target as a fake tensor."""
    model = copy.deepcopy(workload.model)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                fake = fake_mode.from_tensor(p)
                module._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_mode.from_tensor(b)
    return Workload(
        name=workload.name,
        model=model,
        inputs=tuple(fake_mode.from_tensor(t) for t in workload.inputs),
        targets=fake_mode.from_tensor(workload.targets),
        loss_fn=workload.loss_fn,
        blocks=workload.blocks,
    )


@dataclass(kw_only=True, slots=True)
class SacMilpStats:
    """PyTorch's estimates for one training step, reusable across budgets.

    Attributes:
        graph: ``parse_module_info``'s module tree with memory, runtime and trade-off stats.
        sac_stats: module fqn -> ``SACStats`` (per-op memory and time) for the non-leaf modules.
        root: the fqn prefix PyTorch's ``ModTracker`` gives the model (its class name).
        seconds: wall time of the three estimator runs.
    """

    graph: object
    sac_stats: dict[str, object]
    root: str
    seconds: float


def sac_milp_stats(workload: Workload) -> SacMilpStats:
    """Run PyTorch's MemTracker, RuntimeEstimator and SACEstimator on one step, on CPU.

    Each op is run on real CPU tensors of its shapes and timed (see :func:`_cpu_op_timer`);
    the model itself is copied to fake tensors, so ``workload`` is not touched.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.ilp_utils import aggregate_stats, parse_module_info
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.distributed._tools.sac_estimator import SACEstimator

    start = time.perf_counter()
    mode = "operator-level-benchmark"
    fake_mode = FakeTensorMode()
    w = _fake_copy(workload, fake_mode)
    with fake_mode, _cpu_op_timer():

        def step() -> None:
            w.loss_fn(w.model(*w.inputs), w.targets).backward()
            w.model.zero_grad(set_to_none=True)

        mem_tracker = MemTracker()
        mem_tracker.track_external(w.model)
        with mem_tracker as mt:
            step()
            last_snapshot = mt.get_tracker_snapshot("current")
        # As in PyTorch's test_sac_ilp.py: ModTracker's post-backward hook does not fire for
        # modules whose inputs need no gradient (the embeddings), so give them one.
        for stats in mem_tracker.memory_tracking.values():
            if _ModState.POST_BW not in stats.snapshots:
                stats.snapshots.setdefault(_ModState.POST_BW, []).append(
                    copy.deepcopy(last_snapshot)
                )
        runtime_estimator = RuntimeEstimator()
        with contextlib.redirect_stdout(None), runtime_estimator(estimate_mode_type=mode):
            step()
        sac_estimator = SACEstimator()
        with sac_estimator(estimate_mode_type=mode):
            loss = w.loss_fn(w.model(*w.inputs), w.targets)
        loss.backward()
        info = aggregate_stats(
            w.model, mem_tracker, runtime_estimator, sac_estimator, torch.device("cpu")
        )
    return SacMilpStats(
        graph=parse_module_info(info),
        sac_stats=sac_estimator.sac_mod_stats,
        root=type(workload.model).__name__,
        seconds=time.perf_counter() - start,
    )


def sac_milp_plan(
    workload: Workload, memory_budget_fraction: float, *, stats: SacMilpStats | None = None
) -> SacMilpPlan:
    """Plan with PyTorch's SAC estimator and ``sac_milp`` for a fraction of the step peak.

    Args:
        workload: the model (on CPU), inputs, targets, loss and candidate blocks; only the
            blocks named in ``workload.blocks`` may be checkpointed (``sac_milp``'s ``ac_units``).
        memory_budget_fraction: budget as a fraction of PyTorch's predicted un-checkpointed
            step peak, parameters excluded (0.4 is remat's ``"40%"``).
        stats: :func:`sac_milp_stats` of the same workload, to plan several budgets from one
            estimation; estimated here when ``None``.

    Returns:
        A :class:`SacMilpPlan`; ``predicted_peak_bytes == -1`` and an empty ``discard`` when
        ``sac_milp`` finds no feasible plan.

    Raises:
        ValueError: ``memory_budget_fraction`` is not in (0, 1].
    """
    from torch.distributed._tools.ilp_utils import get_peak_memory_runtime_baseline
    from torch.distributed._tools.sac_ilp import (
        get_optimal_checkpointing_policy_per_module,
        sac_milp,
    )

    if not 0 < memory_budget_fraction <= 1:
        raise ValueError(f"memory_budget_fraction must be in (0, 1], got {memory_budget_fraction}")
    start = time.perf_counter()
    if stats is None:
        stats = sac_milp_stats(workload)
    graph, sac_stats, root = copy.deepcopy(stats.graph), stats.sac_stats, stats.root
    params = graph.nodes[0]["param_per_module"]
    base_peak, base_ms = get_peak_memory_runtime_baseline(graph)
    budget = params + memory_budget_fraction * (base_peak - params)
    units = {f"{root}.{name}": name for name in workload.blocks}
    decisions, recompute_ms, peak = sac_milp(graph, budget / 2**30, ac_units=list(units))
    plan = SacMilpPlan(
        budget_fraction=memory_budget_fraction,
        budget_bytes=int(budget - params),
        predicted_peak_bytes=peak - params if peak >= 0 else -1,
        predicted_recompute_ms=recompute_ms,
        baseline_peak_bytes=base_peak - params,
        baseline_compute_ms=base_ms,
    )
    for fqn, discard in decisions.items():
        name, stats = units[fqn], sac_stats[fqn]
        save = get_optimal_checkpointing_policy_per_module(stats, memory_budget=1 - discard)
        if not save:
            raise RuntimeError(f"per-op MILP found no policy for {fqn} at discard {discard}")
        plan.discard[name], plan.save[name] = discard, save
        plan.op_names[name] = list(stats.func_names)
    plan.seconds = time.perf_counter() - start
    return plan


def sac_milp_policies(
    workload: Workload, memory_budget_fraction: float, *, stats: SacMilpStats | None = None
) -> tuple[list[list[int] | None], SacMilpPlan]:
    """PyTorch's plan as per-block save lists, for a ``sac_milp:<budget>`` benchmark row.

    Returns:
        ``(save lists, plan)``: one entry per name in ``workload.blocks``, in order; ``None``
        for a block that is not checkpointed, else 1 = save / 0 = recompute per op.
    """
    plan = sac_milp_plan(workload, memory_budget_fraction, stats=stats)
    return [plan.save.get(name) for name in workload.blocks], plan


def _policy_for(save: list[int], names: list[str], block: str):
    """A SAC policy that saves the ops ``save`` marks, counting ops as the estimator did."""
    from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP
    from torch.utils.checkpoint import CheckpointPolicy

    position = 0

    def policy(ctx, func, *args, **kwargs):
        nonlocal position
        if func in OPS_TO_ALWAYS_SKIP:  # never in the estimator's list: recompute
            return CheckpointPolicy.PREFER_RECOMPUTE
        if position >= len(save) or func._overloadpacket.__name__ != names[position]:
            seen = func._overloadpacket.__name__
            expected = names[position] if position < len(save) else "end of block"
            raise RuntimeError(
                f"sac_milp plan for {block}: op {position} is {seen}, the estimator saw {expected}"
            )
        keep = save[position]
        position += 1
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_sac_milp(workload: Workload, plan: SacMilpPlan) -> None:
    """Checkpoint ``plan``'s blocks with PyTorch's selective checkpointing and its save lists.

    Mirrors ``torch_selective`` in ``benchmarks/planner.py``: each chosen block's ``forward``
    becomes ``checkpoint(..., use_reentrant=False, context_fn=...)``; a fresh policy per call
    walks the block's ops in order and saves those the per-op MILP chose.
    """
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    for name, save in plan.save.items():
        block = workload.model.get_submodule(name)
        names = plan.op_names[name]

        def context_fn(save=save, names=names, name=name):
            return create_selective_checkpoint_contexts(_policy_for(save, names, name))

        block.forward = functools.partial(
            checkpoint, block.forward, use_reentrant=False, context_fn=context_fn
        )


def main(argv: list[str] | None = None) -> list[dict]:
    from remat.bench.workloads import build_workload
    from remat.profiling.step import measure_step_peak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--budgets", default="0.6,0.4,0.25")
    args = parser.parse_args(argv)

    def make() -> Workload:
        return build_workload("gpt", batch=8, n_layers=args.layers, seq_len=256, d_model=256,
                              n_heads=8)  # fmt: skip

    def peak_and_grads(w: Workload) -> tuple[int, dict[str, torch.Tensor]]:
        peak = measure_step_peak(w.model, w.inputs, lambda out: w.loss_fn(out, w.targets))
        w.model.zero_grad(set_to_none=True)
        w.loss().backward()
        return peak, {n: p.grad for n, p in w.model.named_parameters()}

    none_peak, none_grads = peak_and_grads(make())
    print(f"gpt-{args.layers}: none {none_peak / 1e6:.1f} MB measured")
    stats = sac_milp_stats(make())
    print(f"  estimators (MemTracker, RuntimeEstimator, SACEstimator): {stats.seconds:.1f} s")
    rows = []
    for fraction in (float(b) for b in args.budgets.split(",")):
        w = make()
        plan = sac_milp_plan(w, fraction, stats=stats)
        if plan.predicted_peak_bytes < 0:
            print(f"  sac_milp:{fraction}: infeasible ({plan.seconds:.1f} s)")
            continue
        apply_sac_milp(w, plan)
        peak, grads = peak_and_grads(w)
        for n, g in grads.items():
            torch.testing.assert_close(g, none_grads[n], msg=lambda m, n=n: f"{n}: {m}")
        saved = {name: f"{sum(s)}/{len(s)}" for name, s in plan.save.items()}
        print(f"  sac_milp:{fraction}: budget {plan.budget_bytes / 1e6:.1f} MB, "
              f"predicted {plan.predicted_peak_bytes / 1e6:.1f} MB, measured {peak / 1e6:.1f} MB, "
              f"recompute {plan.predicted_recompute_ms:.1f} of {plan.baseline_compute_ms:.1f} ms "
              f"predicted, baseline predicted {plan.baseline_peak_bytes / 1e6:.1f} MB, "
              f"MILPs {plan.seconds:.1f} s, gradients equal")  # fmt: skip
        print(f"    discard {plan.discard}\n    saved ops {saved}")
        rows.append({"fraction": fraction, "measured_peak_bytes": peak,
                     "predicted_peak_bytes": plan.predicted_peak_bytes,
                     "discard": plan.discard, "seconds": plan.seconds})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
