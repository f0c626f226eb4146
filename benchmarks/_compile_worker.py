"""Worker of ``benchmarks/planner.py --compile``: one compiled configuration per process.

Dynamo shares compiled graphs between instances of the same model and does not guard on
``activation_memory_budget``, so each configuration lives in its own process: the parent
starts one per configuration, each compiles and warms up its model, measures its step's
peak with ``remat.AllocationTracker`` (the allocators' events: what Inductor's code
allocates too), prints it as a JSON line, then times one step each time the parent writes
``step`` on its stdin, so that the parent can interleave rounds across processes.

Configurations (``spec["kind"]``):
- ``compile``: ``torch.compile`` with ``activation_memory_budget = spec["budget"]``;
- ``plan``: ``remat.load_plan(spec["plan"])`` applied, then ``remat.compile``;
- ``autoplan``: no model to time; ``remat.autoplan(..., compile=True)`` at each budget of
  ``spec["budgets"]`` (bytes or percentages), one JSON line per budget with the plan.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch._functorch.config as functorch_config

import remat
from remat.measure.allocations import allocated_step_peak


def _say(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def _loss_of(workload):
    return lambda out: workload.loss_fn(out, workload.targets)


def _autoplan(workload, budgets: list) -> None:
    loss = _loss_of(workload)
    profile = remat.profile(workload.model, *workload.inputs, loss_fn=loss)
    for budget in budgets:
        start = time.perf_counter()
        model = workload.model
        try:
            result = remat.autoplan(
                model, *workload.inputs, budget=budget, loss_fn=loss, profile=profile,
                compile=True,
            )  # fmt: skip
        except remat.BudgetError as err:
            _say({"budget": budget, "status": "infeasible", "error": str(err)[:500]})
            continue
        _say({"budget": budget, "status": "ok", "plan": result.plan.to_json(),
              "budget_bytes": result.budget_bytes, "peak_bytes": result.measured_peak_bytes,
              "rounds": result.rounds, "activation_share": result.activation_share,
              "seconds": time.perf_counter() - start})  # fmt: skip
        remat.remove(model)


def _timed(workload, spec: dict) -> None:
    loss = _loss_of(workload)
    if spec["kind"] == "compile":
        functorch_config.activation_memory_budget = spec["budget"]
        compiled = torch.compile(workload.model)
    else:
        remat.apply_plan(workload.model, remat.Plan.from_json(spec["plan"]))
        compiled = remat.compile(workload.model)
    for _ in range(2):  # compile, then warm up
        compiled.zero_grad(set_to_none=True)
        loss(compiled(*workload.inputs)).backward()
    peak = allocated_step_peak(compiled, workload.inputs, loss)
    _say({"status": "ready", "peak_bytes": peak})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        compiled.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss(compiled(*workload.inputs)).backward()
        seconds = time.perf_counter() - start
        compiled.zero_grad(set_to_none=True)  # idle processes hold no gradients
        _say({"seconds": seconds})


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["bench_dir"])
    from planner import make_workload  # the same models as the parent

    torch.manual_seed(0)
    workload = make_workload(spec["model"])
    if spec["kind"] == "autoplan":
        _autoplan(workload, spec["budgets"])
    else:
        _timed(workload, spec)


if __name__ == "__main__":
    main()
