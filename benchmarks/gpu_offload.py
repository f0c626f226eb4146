"""Offloading vs recomputation vs nothing on a GPT model, on a GPU: time, memory, overlap.

For a GPT stack (default 24 layers, d=1024, 16 heads, seq 1024, batch 8) this runs training
steps (forward + backward, no optimizer) with

- ``none``: no checkpointing;
- ``recompute``: every block checkpointed (``remat.every(1)``);
- ``offload``: every block's saved tensors offloaded (``remat.offload()``: pinned host
  buffers, side stream, prefetch of the previous block during backward),

and reports the median step time (the three models are built together and the steps
interleaved: each round runs every configuration once, in a rotating order), the peak device
memory of a step above its start (``torch.cuda.max_memory_allocated``, so parameters and
gradients are not in it; and remat's ``MemoryTracker`` peak, all live storages of the model
and its inputs, for one extra step), the bytes moved per step, and the largest gradient
difference to ``none`` (0 on CPU; on CUDA attention backward may use atomics). The
tracker counts storages created during its step: the store's pooled host buffers exist
before it and are left out (on CUDA its peak is device memory; in the CPU dry run it
understates the host copies). Overlap: the same device-to-host and host-to-device copies are
timed alone on a side stream (CUDA events); ``hidden = copy time - (offload step - none
step)``, clamped to [0, copy time], is the copy time compute covered, as a fraction.

Run on a GPU:  ``python benchmarks/gpu_offload.py [--dtype bf16] [--steps 10]``
(writes ``benchmarks/results/gpu_offload.json``).
Dry run on CPU (``CpuStore``; checks the script, its numbers mean nothing):
``python benchmarks/gpu_offload.py --device cpu --tiny [--json PATH]``.

Exit status: 0 on success; 2, with a one-line message, when ``--device cuda`` (the default)
is asked for and CUDA is not available.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import remat
from remat.bench.workloads import build_workload

CONFIGS = ("none", "recompute", "offload")
DEFAULT_JSON = Path(__file__).parent / "results" / "gpu_offload.json"
TINY = {"layers": 2, "d_model": 64, "heads": 4, "seq_len": 32, "batch": 2, "steps": 3}


def _recording(base: type) -> type:
    """A store that also keeps the byte sizes it was given in the last step, so the
    copies can be timed alone afterwards."""

    class Recording(base):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def put(self, tensor):
            self.sizes.append(tensor.numel() * tensor.element_size())
            return super().put(tensor)

    return Recording


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(workload) -> None:
    workload.model.zero_grad(set_to_none=False)
    workload.loss().backward()


def build(config: str, args: argparse.Namespace):
    """The workload of ``config`` and, for offload, its (recording) store."""
    device = torch.device(args.device)
    workload = build_workload(
        "gpt",
        batch=args.batch,
        device=device,
        dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        seq_len=args.seq_len,
    )
    store = None
    if config == "recompute":
        remat.apply(workload.model, remat.every(1))
    elif config == "offload":
        store = _recording(remat.CpuStore if device.type == "cpu" else remat.CudaPinnedStore)()
        remat.apply(workload.model, remat.offload(min_bytes=args.min_bytes, store=store))
    return workload, store


def timed_step(workload, device: torch.device) -> tuple[float, int | None]:
    """Seconds of one step, and the device memory it allocated above its start (CUDA)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    _step(workload)
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type != "cuda":
        return seconds, None
    return seconds, torch.cuda.max_memory_allocated(device) - start


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """All configurations, interleaved: every round runs each once, in a rotating order,
    so drifting clocks and neighbours' load hit them alike."""
    device = torch.device(args.device)
    built = {config: build(config, args) for config in CONFIGS}
    for workload, _ in built.values():
        for _ in range(args.warmup):
            _step(workload)
    stats0 = {c: dataclasses.replace(s.stats) for c, (_, s) in built.items() if s is not None}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    peaks: dict[str, list[int]] = {c: [] for c in CONFIGS}
    for r in range(args.steps):
        for config in CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]:
            workload, store = built[config]
            if store is not None:
                store.sizes.clear()  # keeps the sizes of the last step
            seconds, peak = timed_step(workload, device)
            times[config].append(seconds)
            if peak is not None:
                peaks[config].append(peak)
    reference = {n: p.grad.clone() for n, p in built["none"][0].model.named_parameters()}
    rows: dict[str, dict[str, Any]] = {}
    for config, (workload, store) in built.items():
        grads = dict(workload.model.named_parameters())
        rows[config] = row = {
            "config": config,
            "median_ms": 1e3 * statistics.median(times[config]),
            "min_ms": 1e3 * min(times[config]),
            "step_peak_bytes": max(peaks[config]) if peaks[config] else None,
            "max_grad_diff": max(
                (grads[n].grad.float() - g.float()).abs().max().item() for n, g in reference.items()
            ),
        }
        if store is not None:
            before, after, n = stats0[config], store.stats, args.steps
            row["bytes_out_per_step"] = (after.bytes_out - before.bytes_out) // n
            row["bytes_in_per_step"] = (after.bytes_in - before.bytes_in) // n
            row["tensors_per_step"] = (after.tensors_out - before.tensors_out) // n
            row["prefetched_per_step"] = (after.tensors_prefetched - before.tensors_prefetched) // n
            row["host_pool_bytes"] = after.bytes_allocated
            row["copy_sizes"] = list(store.sizes)
        if args.tracker:
            workload.model.zero_grad(set_to_none=False)
            existing = [workload.model, *workload.inputs]
            with remat.MemoryTracker(
                module=workload.model, count_existing=existing, timeline=False
            ) as mt:
                workload.loss().backward()
            row["tracker_peak_bytes"] = mt.peak_bytes
    return rows


def time_copies(sizes: list[int], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Device-to-host then host-to-device copies of ``sizes`` alone, in milliseconds."""
    if not sizes:
        return {"d2h_ms": 0.0, "h2d_ms": 0.0}
    pinned = device.type == "cuda"
    dev = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=pinned) for n in sizes]
    d2h, h2d = [], []
    for _ in range(repeats):
        if pinned:
            stream = torch.cuda.Stream(device)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            torch.cuda.synchronize(device)
            with torch.cuda.stream(stream):
                marks[0].record(stream)
                for d, h in zip(dev, host):
                    h.copy_(d, non_blocking=True)
                marks[1].record(stream)
                for d, h in zip(dev, host):
                    d.copy_(h, non_blocking=True)
                marks[2].record(stream)
            marks[2].synchronize()
            d2h.append(marks[0].elapsed_time(marks[1]))
            h2d.append(marks[1].elapsed_time(marks[2]))
        else:
            t0 = time.perf_counter()
            for d, h in zip(dev, host):
                h.copy_(d)
            t1 = time.perf_counter()
            for d, h in zip(dev, host):
                d.copy_(h)
            d2h.append(1e3 * (t1 - t0))
            h2d.append(1e3 * (time.perf_counter() - t1))
    return {"d2h_ms": statistics.median(d2h), "h2d_ms": statistics.median(h2d)}


def overlap(rows: dict[str, dict], copies: dict[str, float]) -> dict[str, float]:
    copy_ms = copies["d2h_ms"] + copies["h2d_ms"]
    overhead = rows["offload"]["median_ms"] - rows["none"]["median_ms"]
    hidden = min(max(copy_ms - max(overhead, 0.0), 0.0), copy_ms)
    return {
        **copies,
        "copy_ms": copy_ms,
        "offload_overhead_ms": overhead,
        "hidden_ms": hidden,
        "overlap_fraction": hidden / copy_ms if copy_ms else 0.0,
    }


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def print_table(rows: list[dict], summary: dict[str, float]) -> None:
    header = ("config", "median ms", "step peak MiB", "tracker MiB", "moved MiB", "max |dgrad|")
    lines = [header]
    for r in rows:
        moved = r.get("bytes_out_per_step")
        lines.append((
            r["config"], f"{r['median_ms']:.1f}", _mib(r["step_peak_bytes"]),
            _mib(r.get("tracker_peak_bytes")),
            "-" if moved is None else f"{_mib(moved)} out + {_mib(r['bytes_in_per_step'])} in",
            f"{r['max_grad_diff']:.3g}",
        ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    print(
        f"copies alone: d2h {summary['d2h_ms']:.1f} ms + h2d {summary['h2d_ms']:.1f} ms; "
        f"offload costs {summary['offload_overhead_ms']:.1f} ms over none; "
        f"hidden behind compute: {summary['hidden_ms']:.1f} ms "
        f"({100 * summary['overlap_fraction']:.0f}%)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-bytes", type=int, default=1 << 20)
    p.add_argument("--no-tracker", dest="tracker", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny model, for a dry run")
    p.add_argument("--json", type=Path, default=None, help=f"default on cuda: {DEFAULT_JSON}")
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
        args.warmup, args.min_bytes = 1, 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_offload: CUDA is not available (dry run: --device cpu --tiny)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rows = run(args)
    summary = overlap(rows, time_copies(rows["offload"].pop("copy_sizes"), device))
    print_table(list(rows.values()), summary)
    command = [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    sizes = ("dtype", "layers", "d_model", "heads", "seq_len", "batch", "steps", "warmup")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command),
        "device": name,
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in (*sizes, "min_bytes")},
    }
    path = args.json or (DEFAULT_JSON if device.type == "cuda" else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {"meta": meta, "rows": list(rows.values()), "overlap": summary}
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
