"""``remat plan``: profile a model, plan it for a budget, print the plan and its
prediction; with ``--verify``, apply it, measure the step and compare the gradients."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import remat
from remat.bench.configurations import check_budget, offload_store_for
from remat.bench.model_choice import DTYPES, build_bench_workload, check_model, check_model_options
from remat.bench.runner import resolve_device
from remat.bench.user_models import parse_model_args
from remat.cli.common import error, output_path_error, sizes_given
from remat.errors import MissingExtraError
from remat.measure.storage import unique_storage_bytes
from remat.planner.sharding import shard_profile, sharded_state
from remat.planner.training_state import OPTIMIZER_STATE_BYTES, training_state
from remat.solver import SOLVERS
from remat.solver.budget import looks_like_percent, parse_budget
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


@dataclass
class _Planned:
    """The workload, its profile, the plan, and the state the budget shares (``resident``,
    with ``--optimizer``) beside the inputs' bytes."""

    workload: Any
    profile: Any
    plan: Any
    resident: Any = None
    inputs: int = 0


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
    return _Checked(sizes=sizes, model_args=model_args, device=device, target=target)


def _build(args: argparse.Namespace, checked: _Checked) -> Any:
    return build_bench_workload(
        args.model,
        batch=args.batch,
        device=checked.device,
        dtype=args.dtype,
        seed=args.seed,
        sizes=checked.sizes,
        model_args=checked.model_args,
    )


def _plan(args: argparse.Namespace, checked: _Checked) -> _Planned:
    """Profile, shard for ``--world-size``, take the state out of the budget, plan."""
    workload = _build(args, checked)
    prof = remat.profile(
        workload.model,
        *workload.inputs,
        loss_fn=workload.loss_of,
        target_device=checked.target,
        **workload.kwargs,
    )
    prof = shard_profile(prof, workload.model, args.world_size)
    budget, resident, inputs = args.budget, None, 0
    if args.optimizer is not None:  # the step's new bytes get what the state leaves
        resident = training_state(workload.model, args.optimizer)
        if args.world_size > 1:
            regions = [r.name for r in prof.regions]
            resident = sharded_state(resident, workload.model, regions, args.world_size)
        inputs = unique_storage_bytes(workload.tensors)
        left = parse_budget(args.budget) - resident.total - inputs
        print(resident.describe(inputs, left))
        if left < 1:
            raise remat.BudgetError(
                f"--budget {args.budget}: the parameters, optimizer state and inputs alone "
                f"take {(resident.total + inputs) / 1e6:.2f} MB"
            )
        budget = left
    chosen = remat.plan(prof, budget, solver=args.solver)
    return _Planned(workload, prof, chosen, resident, inputs)


def _print_plan(args: argparse.Namespace, checked: _Checked, planned: _Planned) -> None:
    prof, chosen, resident = planned.profile, planned.plan, planned.resident
    print(chosen)
    print(
        f"un-checkpointed step peak {prof.step_peak_bytes / 1e6:.2f} MB; planned peak "
        f"{chosen.predicted_peak_bytes / 1e6:.2f} MB (the head and loss add "
        f"{prof.tail_bytes / 1e6:.2f} MB after the blocks; {prof.outside_bytes / 1e6:.2f} MB "
        "live beside them: what ran before, shared inputs)"
    )
    if resident is not None:
        held = resident.total + planned.inputs
        print(
            f"predicted peak per {'rank' if args.world_size > 1 else 'device'} "
            f"{(chosen.predicted_peak_bytes + held) / 1e6:.2f} MB: the plan's "
            f"{chosen.predicted_peak_bytes / 1e6:.2f} MB on top of "
            f"{held / 1e6:.2f} MB of parameters, optimizer state and inputs"
        )
    if checked.target is not None:
        # The backward taken as twice the forward: a matmul's backward is two matmuls.
        plain = 3 * chosen.forward_cost
        print(
            f"predicted step time on {checked.target.name} "
            f"{(plain + chosen.extra_cost) * 1e3:.3g} ms "
            f"(the blocks' forward, twice that for the backward, and the recomputation): "
            f"{chosen.extra_cost / plain if plain else 0:.1%} over no checkpointing"
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
