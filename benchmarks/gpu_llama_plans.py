"""Predicted against measured: three plans of a ~1B Llama, planned on meta for the GPU it runs on.

The model (Llama-3.2-1B's shape by default: 16 layers, hidden 2048, MLP 8192, 32 heads, 8 KV
heads, bf16) is built twice from one seed: on the meta device, where ``remat.profile(...,
target_device=TARGET)`` predicts every region's bytes and seconds with nothing allocated, and
on the real device, where each plan is applied and one training step measured. Three plans:

- none: every layer stores what it saves;
- full: every layer recomputed;
- remat: the chain planner's plan for ``--budget`` of the un-checkpointed step.

Per plan: the predicted step peak (new bytes: parameters and inputs aside; the plan's peak
plus what the profile leaves outside the chain) against the measured one, by remat's
``MemoryTracker`` and, on CUDA, ``torch.cuda.max_memory_allocated`` over the step; and the
predicted step time (the forward, twice that for the backward, the recomputation) against the
median of ``--rounds`` interleaved timed steps. Times are compared as ratios to ``none`` too,
which a roofline gets right more often than absolute seconds.

Run on a GPU: ``python benchmarks/gpu_llama_plans.py [--target h200] [--json PATH]``.
On CPU, ``--dry-run`` runs a 2-layer model for ``target_device="cpu"`` (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from _timing import interleaved_seconds, step_seconds
from llama_plans import llama_workload

import remat
from remat.bench.configurations import offload_store_for
from remat.profiling.step import measure_step_peak

MB = 10**6
SHAPE_1B = {"n_layers": 16, "d_model": 2048, "heads": 32, "mlp": 8192, "kv": 8}
SHAPE_DRY = {"n_layers": 2, "d_model": 128, "heads": 4, "mlp": 256, "kv": 2}


def predicted_plans(meta, target: str, budget: str) -> tuple[remat.Profile, dict]:
    prof = remat.profile(
        meta.model, *meta.inputs, loss_fn=meta.loss_of, target_device=target, **meta.kwargs
    )
    n = len(prof.regions)
    return prof, {  # predicted as remat.plan predicts: what lives beside the chain included
        "none": remat.plan_from_choices(prof, ["store"] * n),
        "full": remat.plan_from_choices(prof, ["recompute"] * n),
        "remat": remat.plan(prof, budget),
    }


def cuda_step_peak(workload) -> int:
    """``max_memory_allocated`` over one step, above what was allocated before it."""
    device = workload.inputs[0].device
    workload.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    workload.loss().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    workload.model.zero_grad(set_to_none=True)
    return peak


def measure(workload, plan) -> dict:
    remat.apply_plan(workload.model, plan, offload_store=offload_store_for(workload.device))
    peak = measure_step_peak(workload.model, workload.inputs, workload.loss_of, **workload.kwargs)
    out = {"tracker_peak_bytes": peak}
    if workload.device.type == "cuda":
        out["cuda_peak_bytes"] = cuda_step_peak(workload)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="default: h200 on a GPU, cpu with --dry-run")
    ap.add_argument("--budget", default=None, help="default: 50%% on a GPU, 85%% dry")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="a 2-layer model on CPU")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_llama_plans.json"))
    args = ap.parse_args()
    if args.dry_run:
        shape, device, dtype, vocab = SHAPE_DRY, "cpu", torch.float32, 512
        target, budget = args.target or "cpu", args.budget or "85%"
        batch, seq_len = 2, min(args.seq_len, 64)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on CPU")
        shape, device, dtype, vocab = SHAPE_1B, "cuda", torch.bfloat16, 128256
        target, budget = args.target or "h200", args.budget or "50%"
        batch, seq_len = args.batch, args.seq_len
    sizes = {"seq_len": seq_len, "batch": batch, "dtype": dtype, "vocab_size": vocab}
    meta = llama_workload(shape, device="meta", **sizes)
    prof, plans = predicted_plans(meta, target, budget)
    del meta
    workloads = {name: llama_workload(shape, device=device, **sizes) for name in plans}
    rows = {}
    for name, plan in plans.items():
        rows[name] = {
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "predicted_step_seconds": 3 * prof.forward_cost + plan.extra_cost,
            **measure(workloads[name], plan),
        }
    times = interleaved_seconds(workloads, args.rounds, args.warmup, step_seconds)
    for name in plans:
        rows[name]["measured_step_seconds"] = statistics.median(times[name])
    base_p, base_m = (rows["none"][k] for k in ("predicted_step_seconds", "measured_step_seconds"))
    print(f"llama {shape}, batch {batch}, seq {seq_len}, {dtype}, {device}, target {target}")
    print("| plan | predicted MB | tracker MB | cuda MB | predicted ms | measured ms | "
          "predicted ×none | measured ×none |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        cuda = f"{r['cuda_peak_bytes'] / MB:.1f}" if "cuda_peak_bytes" in r else "-"
        predicted, measured = r["predicted_step_seconds"], r["measured_step_seconds"]
        print(
            f"| {name} | {r['predicted_peak_bytes'] / MB:.1f} | "
            f"{r['tracker_peak_bytes'] / MB:.1f} | {cuda} | {predicted * 1e3:.1f} | "
            f"{measured * 1e3:.1f} | {predicted / base_p:.2f} | {measured / base_m:.2f} |"
        )
    document = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "target": target, "shape": shape, "batch": batch, "seq_len": seq_len,
        "dtype": str(dtype), "budget": budget,
        "plans": {name: plan.to_dict() for name, plan in plans.items()}, "rows": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
