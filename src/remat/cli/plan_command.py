"""``remat plan``: profile a model, plan it for a budget, print the plan and its
prediction; with ``--verify``, apply it, measure the step and compare the gradients."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from typing import Any

import remat
from remat.bench.configurations import check_budget, offload_store_for
from remat.bench.model_choice import DTYPES, check_model, check_model_options
from remat.bench.runner import resolve_device
from remat.bench.user_models import parse_model_args
from remat.cli.common import error, output_path_error, sizes_given
from remat.cli.plan_advice import build_and_profile, cheaper_changes, headroom_for
from remat.errors import MissingExtraError
from remat.planner.device_budget import DeviceBudget, parse_headroom
from remat.planner.fitting import device_budget_for, device_budget_lines, least_step_peak
from remat.planner.sharding import shard_profile
from remat.planner.training_state import OPTIMIZER_STATE_BYTES
from remat.solver import SOLVERS
from remat.solver.budget import looks_like_percent, parse_budget
from remat.solver.compile_budget import activation_share
from remat.solver.units import fmt_bytes, fmt_seconds
from remat.targets.devices import Target, describe_targets, get_target

__all__ = ["run_plan_command"]

_BAD_INPUT = (ValueError, TypeError, RuntimeError, MissingExtraError)


@dataclass
class _Checked:
    """The command line, checked before the profile's minutes."""

    sizes: dict[str, int]
    model_args: dict[str, Any]
    device: str
    target: Target | None
    budget_bytes: int | None = None  # --budget as bytes (None: a percentage)


@dataclass
class _Planned:
    """The workload, its profile, the plan, and (with ``--optimizer``) how the device's
    memory is shared between the job's state, the headroom and the step."""

    workload: Any
    profile: Any
    plan: Any
    device_budget: DeviceBudget | None = None


def run_plan_command(args: argparse.Namespace) -> int:
    if args.target == "list":
        print(describe_targets())
        return 0
    try:
        checked = _check(args)
    except _BAD_INPUT as e:
        return error(str(e), "plan")
    try:
        planned = _plan(args, checked)
    except remat.BudgetError as e:
        print(f"remat plan: {e}", file=sys.stderr)
        return 1
    except _BAD_INPUT as e:
        print(f"remat plan: error: {e}", file=sys.stderr)
        return 2
    _print_plan(args, checked, planned)
    report: dict[str, Any] = {
        "plan": planned.plan.to_dict(),
        "step_peak_bytes": planned.profile.step_peak_bytes,
    }
    if planned.device_budget is not None:
        budget = planned.device_budget
        report["device_budget"] = {
            "device_bytes": budget.device_bytes,
            "headroom_bytes": budget.headroom_bytes,
            "resident_bytes": budget.resident_bytes,
            "step_bytes": budget.step_bytes,
            "peak_bytes": budget.total_for(planned.plan.predicted_peak_bytes),
        }
    status = 0
    if args.verify:
        status = _verify(planned, report, seed=args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return status


def _check(args: argparse.Namespace) -> _Checked:
    """Everything that can be checked before the profile's minutes."""
    sizes = sizes_given(args)
    check_model(args.model)
    model_args = parse_model_args(args.model_args)
    check_model_options(args.model, batch=args.batch, sizes=sizes, model_args=model_args)
    check_budget(args.budget, "--budget")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype}: valid dtypes are {', '.join(DTYPES)}")
    if args.solver not in SOLVERS:
        raise ValueError(f"--solver {args.solver}: valid solvers are {', '.join(SOLVERS)}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be a positive integer")
    problem = output_path_error("--json", args.json)
    if problem is not None:
        raise ValueError(problem)
    device = "meta" if args.device == "meta" else resolve_device(args.device)
    if device == "meta" and args.verify:
        raise ValueError("--verify runs the model: it needs --device cpu or cuda, not meta")
    if args.compile and (device == "meta" or args.optimizer is not None):
        raise ValueError(
            "--compile measures each plan compiled on this machine: it needs --device cpu or "
            "cuda, and a --budget for the step (no --optimizer, --world-size or meta)"
        )
    target = None if args.target is None else get_target(args.target)
    if args.optimizer is not None:
        if args.optimizer not in OPTIMIZER_STATE_BYTES:
            known = ", ".join(OPTIMIZER_STATE_BYTES)
            raise ValueError(f"--optimizer {args.optimizer}: known optimizers are {known}")
        if looks_like_percent(args.budget) or args.budget.strip().endswith("%"):
            raise ValueError(
                f"--budget {args.budget} with --optimizer: give the device's memory in "
                "bytes (80GiB), which parameters, optimizer state and activations share"
            )
    if args.world_size < 1 or (args.world_size > 1 and args.optimizer is None):
        raise ValueError(f"--world-size {args.world_size}: a positive count, with --optimizer")
    budget_bytes = None if args.budget.strip().endswith("%") else parse_budget(args.budget)
    if args.headroom is not None:
        if args.optimizer is None:
            raise ValueError("--headroom applies with --optimizer, when --budget is the device")
        parse_headroom(args.headroom, budget_bytes or 0)
    return _Checked(
        sizes=sizes, model_args=model_args, device=device, target=target, budget_bytes=budget_bytes
    )


def _plan(args: argparse.Namespace, checked: _Checked) -> _Planned:
    """Profile, shard for ``--world-size``, take the state and headroom out of the budget,
    plan. Raises ``BudgetError`` in ``--budget``'s quantity, with the changes that fit."""
    workload, whole = build_and_profile(args, checked, batch=args.batch, sizes=checked.sizes)
    prof = shard_profile(whole, workload.model, args.world_size)
    if args.compile:
        return _Planned(workload, prof, _compiled_plan(args, workload, prof))
    if args.optimizer is None:  # the budget is the step's new bytes, as the profile counts
        return _Planned(workload, prof, remat.plan(prof, args.budget, solver=args.solver))
    device = checked.budget_bytes or 0
    device_budget = device_budget_for(
        workload.model, workload.tensors, prof, args.optimizer, args.world_size, device,
        headroom=headroom_for(args, checked, device, args.world_size),
    )  # fmt: skip
    for line in device_budget_lines(workload, prof, args.optimizer, args.world_size):
        print(line)
    print(device_budget.split())
    try:
        if device_budget.step_bytes < 1:
            raise remat.BudgetError("", min_feasible_bytes=least_step_peak(prof))
        chosen = remat.plan(prof, device_budget.step_bytes, solver=args.solver)
    except remat.BudgetError as err:
        step = err.min_feasible_bytes or least_step_peak(prof)
        advice = cheaper_changes(args, checked, workload, whole, device_budget)
        raise remat.BudgetError(
            f"does not fit: --budget {args.budget} leaves the step "
            f"{fmt_bytes(max(device_budget.step_bytes, 0))} after the state, inputs and "
            f"headroom;\n  it needs --budget >= "
            f"{fmt_bytes(device_budget.needed_for(step), round_up=True)}"
            + (f"\n  cheapest changes: {advice}" if advice else ""),
            min_feasible_bytes=device_budget.needed_for(step),
        ) from None
    return _Planned(workload, prof, chosen, device_budget)


def _compiled_plan(args: argparse.Namespace, workload: Any, prof: Any) -> Any:
    """``remat.autoplan(..., compile=True)`` on a copy of the model: the plan whose
    compiled step measures within the budget."""
    result = remat.autoplan(
        copy.deepcopy(workload.model), *workload.inputs, budget=args.budget,
        loss_fn=workload.loss_of, solver=args.solver, profile=prof, compile=True,
        **workload.kwargs,
    )  # fmt: skip
    print(
        f"compiled: the step measures {fmt_bytes(result.measured_peak_bytes)} under "
        f"torch.compile, within --budget {args.budget} = {fmt_bytes(result.budget_bytes)} "
        f"({result.rounds} plan(s) compiled and measured)"
    )
    return result.plan


def _print_plan(args: argparse.Namespace, checked: _Checked, planned: _Planned) -> None:
    prof, chosen, device_budget = planned.profile, planned.plan, planned.device_budget
    print(chosen.table(verbose=args.verbose))
    print(
        f"step peak (new bytes: activations and gradients): un-checkpointed "
        f"{fmt_bytes(prof.step_peak_bytes)}, planned {fmt_bytes(chosen.predicted_peak_bytes)}"
    )
    print(
        f"  the head and loss add {fmt_bytes(prof.tail_bytes)} after the blocks; "
        f"{fmt_bytes(prof.outside_bytes)} lives beside them (what ran before, shared inputs)"
    )
    if checked.target is not None:
        # The backward taken as twice the forward: a matmul's backward is two matmuls.
        plain = 3 * chosen.forward_cost
        print(
            f"step time on {checked.target.name}: {fmt_seconds(plain + chosen.extra_cost)} "
            f"predicted (forward, backward as twice it, recomputation), "
            f"{chosen.extra_cost / plain if plain else 0:.1%} over no checkpointing"
        )
    share = activation_share(prof.to_chain(), chosen)
    print(
        f"as torch.compile's activation_memory_budget: {share:.2f} (it keeps {share:.0%} of "
        "the activations kept without recomputation)"
    )
    if args.compile:
        return  # the compiled measurement said whether it fits
    if device_budget is not None:
        print(device_budget.verdict(chosen.predicted_peak_bytes))
    else:
        budget = chosen.budget_bytes or 0
        spare = budget - chosen.predicted_peak_bytes
        print(
            f"fits: the step peaks at {fmt_bytes(chosen.predicted_peak_bytes)}, within --budget "
            f"{args.budget} = {fmt_bytes(budget)} ({fmt_bytes(spare)} to spare)"
        )


def _verify(planned: _Planned, report: dict[str, Any], *, seed: int) -> int:
    """Apply the plan to a copy, measure the step's peak and compare the gradients with an
    un-checkpointed copy (``remat.verify_plan``): 0 when within the budget and the
    prediction with equal gradients, else 1."""
    workload = planned.workload
    check = remat.verify_plan(
        workload.model,
        planned.plan,
        *workload.inputs,
        loss_fn=workload.loss_of,
        seed=seed,
        offload_store=offload_store_for(workload.device),
        **workload.kwargs,
    )
    print(check)
    report["verify"] = {
        "measured_peak_bytes": check.measured_peak_bytes,
        "max_grad_diff": check.max_gradient_difference,
        "mismatched": list(check.mismatched),
    }
    return 0 if check.ok else 1
