"""Worker of ``benchmarks/planner.py``: ``torch.compile`` with ``activation_memory_budget``.

Inside a compiled graph a dispatch-mode tracker sees nothing (dynamo falls back to eager
under one), so this process measures the step's peak from the operating system: the
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above what
was resident before the step. The parent starts it with ``MALLOC_MMAP_THRESHOLD_`` set, so
every tensor is its own mapping that goes back to the system when freed and the resident
set follows live memory; on eager models this agrees with remat's tracker to within 1 MB.

Prints one JSON line for the budget it is given: peak bytes and median step time; the
parent divides by budget 1.0's (the compiled model without recomputation).
Linux only. Run by ``benchmarks/planner.py --compile``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch._functorch.config as functorch_config


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_of_step(model, workload) -> tuple[int, float]:
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    start = time.perf_counter()
    workload.loss_fn(model(*workload.inputs), workload.targets).backward()
    seconds = time.perf_counter() - start
    return _status("VmHWM") - before, seconds


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["bench_dir"])
    from planner import make_workload  # the same models as the parent

    # One budget per process: dynamo shares compiled graphs between instances of the same
    # model and does not guard on this setting, so a second budget would reuse the first's.
    functorch_config.activation_memory_budget = spec["budget"]
    workload = make_workload(spec["model"])
    model = torch.compile(workload.model)
    for _ in range(2):  # compile, then warm up
        peak_of_step(model, workload)
    runs = [peak_of_step(model, workload) for _ in range(spec["steps"])]
    print(json.dumps({"budget": spec["budget"],
                      "peak_bytes": int(statistics.median(p for p, _ in runs)),
                      "seconds": statistics.median(s for _, s in runs)}))  # fmt: skip


if __name__ == "__main__":
    main()
