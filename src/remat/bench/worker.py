"""The worker process of ``remat bench``: one configuration, driven over a pipe.

Started as ``python -m remat.bench.worker '<json spec>'``. It builds the workload, applies
its configuration, answers ``ready``, then serves one command per stdin line, answering one
JSON line each on its original stdout (anything the model prints goes to stderr instead):

- ``measure``: one tracked training step (memory, saved bytes, timeline), gradients written
  to ``spec["grads_path"]``, then one step under ``FlopCounterMode``.
- ``step``: one timed training step; answers its wall time in seconds.
- ``quit``: exit.

Failures answer ``{"ok": false, "status": "oom"|"infeasible"|"crashed", "error": ...}`` and
exit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

from remat.bench.configurations import CONFIGS
from remat.bench.model_choice import build_bench_workload
from remat.bench.workloads import Workload
from remat.errors import BudgetError
from remat.measure.storage import tensors_of, unique_storage_bytes
from remat.measure.tracker import MemoryTracker

TIMELINE_POINTS = 1500


def classify(exc: BaseException) -> str:
    """``"oom"`` for an allocator failure (CPU or CUDA), ``"infeasible"`` for a planner
    budget that no plan meets (``auto:<budget>``), else ``"crashed"``."""

    if isinstance(exc, BudgetError):
        return "infeasible"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    text = str(exc).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return "oom"
    return "crashed"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _step(workload: Workload, seed: int) -> torch.Tensor:
    # Same seed before every step: dropout draws the same masks in every configuration.
    _zero_grads(workload.model)
    torch.manual_seed(seed)
    loss = workload.loss()
    loss.backward()
    # No op after backward here: the tracker would count it in the forward phase.
    return loss


def downsample(points: list[tuple[int, int]], limit: int = TIMELINE_POINTS) -> list[list[int]]:
    """Max-pool ``(index, bytes)`` points to at most ``limit``, keeping each chunk's peak."""
    if len(points) <= limit:
        return [list(p) for p in points]
    chunk = math.ceil(len(points) / limit)
    return [
        list(max(points[i : i + chunk], key=lambda p: p[1])) for i in range(0, len(points), chunk)
    ]


def measure(workload: Workload, seed: int, grads_path: str) -> dict[str, Any]:
    """Memory, FLOPs, loss and gradients of one training step."""

    model, device = workload.model, workload.device
    _zero_grads(model)
    _sync(device)
    existing = (model, *workload.tensors)
    with MemoryTracker(module=model, count_existing=existing) as t:
        loss = _step(workload, seed)
    _sync(device)
    timeline = [(i, e.live_bytes) for i, e in enumerate(t.timeline)]
    backward_start = next((i for i, e in enumerate(t.timeline) if e.phase == "backward"), None)
    grads = {
        n: None if p.grad is None else p.grad.detach().cpu() for n, p in model.named_parameters()
    }
    loss = loss.detach()
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
    torch.save({"loss": loss.cpu(), "grads": grads, "buffers": buffers}, grads_path)
    out = {
        "forward_peak_bytes": t.peak_by_phase.get("forward"),
        "step_peak_bytes": t.peak_bytes,
        # what remat.profile calls the step's peak and percentage budgets refer to
        "step_new_peak_bytes": t.peak_bytes - unique_storage_bytes(tensors_of(existing)),
        "saved_bytes": t.saved_bytes,
        "cuda_max_allocated_bytes": t.cuda_max_allocated,
        "cuda_max_reserved_bytes": t.cuda_max_reserved,
        "timeline": downsample(timeline),
        "backward_start": backward_start,
        "loss": loss.item(),
    }
    del grads, buffers, loss
    with flop_counter() as counter:
        _step(workload, seed)
    out["flops"] = int(counter.get_total_flops())
    return out


class _NoModuleTracking:
    """Stands in for FlopCounterMode's ModuleTracker: we only need the global total."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def flop_counter():
    """A ``FlopCounterMode`` counting only the total, without per-module tracking.

    Its ModuleTracker puts multi-grad hooks on module inputs; they raise "A leaf node was
    passed to _will_engine_execute_node but we are currently running autograd.grad()" when a
    checkpoint's backward calls ``torch.autograd.grad`` (remat.CheckpointFunction does). The
    totals are the same: ``tests/bench/test_runner.py`` checks it against the plain mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _NoModuleTracking()
    return counter


def timed_step(workload: Workload, seed: int) -> float:
    """Wall time of one training step, in seconds."""
    device = workload.device
    _sync(device)
    start = time.perf_counter()
    _step(workload, seed)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    # The parent's import path too: a --model package.module:factory it found is found here.
    sys.path.extend(p for p in spec.get("sys_path", ()) if p not in sys.path)
    # Keep the protocol on the original stdout; stray prints from models go to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    def fail(exc: BaseException) -> int:
        traceback.print_exc()
        send(ok=False, status=classify(exc), error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return 1

    try:
        workload = build_bench_workload(
            spec["model"],
            batch=spec["batch"],
            device=spec["device"],
            dtype=spec["dtype"],
            seed=spec["seed"],
            sizes=spec["sizes"],
            model_args=spec["model_args"],
        )
        keys = list(workload.model.state_dict())
        base, _, arg = spec["config"].partition(":")
        CONFIGS[base].apply(workload, arg or None)
        if list(workload.model.state_dict()) != keys:
            raise RuntimeError(f"configuration {spec['config']!r} changed the state_dict keys")
        workload.model.train()
        device = workload.device
        send(
            ok=True,
            parameters=sum(p.numel() for p in workload.model.parameters()),
            batch=workload.batch,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        )
    except Exception as exc:
        return fail(exc)

    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "measure":
                send(ok=True, **measure(workload, spec["seed"], spec["grads_path"]))
            elif command == "step":
                send(ok=True, seconds=timed_step(workload, spec["seed"]))
            elif command == "quit":
                return 0
            else:
                raise ValueError(f"unknown worker command {command!r}")
        except Exception as exc:
            return fail(exc)
    return 0


# ---- the parent's side of the pipe


class WorkerProcess:
    """The parent's handle on one configuration's worker process."""

    def __init__(self, name: str, index: int, options: Any, device: str, tmp: str):
        self.name = name
        self.status, self.error = "ok", None
        self.grads_path = os.path.join(tmp, f"grads{index}.pt")
        self.log_path = os.path.join(tmp, f"worker{index}.log")
        spec = {
            "model": options.model,
            "config": name,
            "batch": options.batch,
            "device": device,
            "dtype": options.dtype,
            "seed": options.seed,
            "sizes": options.sizes,
            "model_args": options.model_args,
            "grads_path": self.grads_path,
            "sys_path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
        }
        # Run from this source tree even when remat is not installed.
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        }
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "remat.bench.worker", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        self.alive = True

    def read(self) -> dict[str, Any] | None:
        """The worker's next answer; ``None`` (and the result marked) once it has failed."""
        if not self.alive:
            return None
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line else self._death()
        if not msg["ok"]:
            self.alive = False
            self.status, self.error = msg["status"], msg["error"]
            return None
        return msg

    def request(self, command: str) -> dict[str, Any] | None:
        if not self.alive:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError:  # the pipe broke: it died; read() reports how
            pass
        return self.read()

    def _death(self) -> dict[str, Any]:
        code = self.proc.wait()
        if code < 0:
            sig = signal.Signals(-code).name
            # The kernel's OOM killer sends SIGKILL; nothing else here does.
            oom = -code == signal.SIGKILL
            error = f"worker killed by {sig}" + (" (out of memory?)" if oom else "")
            return {"ok": False, "status": "oom" if oom else "crashed", "error": error}
        with open(self.log_path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        tail = lines[-1] if lines else "no output"
        return {"ok": False, "status": "crashed", "error": f"worker exited with {code}: {tail}"}

    def kill(self) -> None:
        """End the worker now (the parent is being interrupted)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
