"""Forward peak memory of the tutorial's MLP with and without checkpointing blocks 1–2.

Each configuration runs in its own process (the tutorial found same-process figures
disagree, because the CUDA caching allocator keeps blocks between runs). Memory is measured
with ``remat.MemoryTracker``, which counts tensor storages exactly on any device; weights and
the input are included, as in the tutorial's ``torch.cuda.max_memory_allocated`` figures. On a
GPU the allocator's own peaks are printed beside it.

Blocks 1–2 are checkpointed as ONE region, as in the tutorial
(``checkpoint(self._checkpoint_layers, x)`` with ``x`` requiring grad): only the region's input
is kept. Configurations:
  none            the plain model
  torch           blocks 1–2 as one region under torch.utils.checkpoint(use_reentrant=False)
  torch-reentrant the same with use_reentrant=True (the tutorial's call; fine here, since x
                  requires grad)
  remat           blocks 1–2 as one region under remat.checkpoint
  per-block       block 1 and block 2 checkpointed separately: block 1's output (3072 x 700
                  floats, 8.6 MB) is kept as block 2's input
  reentrant-bug   reentrant checkpoint with an input that does not require grad: less
                  memory, but blocks 1–2 then get NO gradients

Run: python examples/03_memory_benchmark.py [--batch 3072] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import torch
import torch.utils.checkpoint as tuc

import remat
from remat.bench.workloads import build_workload

CONFIGS = ("none", "torch", "torch-reentrant", "remat", "per-block", "reentrant-bug")
MB = 1e6


def measure(config: str, batch: int, device: str) -> dict:
    """One configuration's figures, in bytes (run in a fresh process)."""
    w = build_workload("mlp", batch=batch, device=device)
    model, (x,) = w.model, w.inputs
    x.requires_grad_(config != "reentrant-bug")  # the tutorial's input requires grad

    def checkpoint_layers(x: torch.Tensor) -> torch.Tensor:  # the tutorial's blocks 1–2
        return model.block2(model.block1(x))

    def run_blocks(x: torch.Tensor) -> torch.Tensor:
        if config == "none":
            return model(x)
        if config == "remat":
            h = remat.checkpoint(checkpoint_layers, x)
        elif config == "per-block":
            h = remat.checkpoint(model.block2, remat.checkpoint(model.block1, x))
        else:
            reentrant = config in ("torch-reentrant", "reentrant-bug")
            h = tuc.checkpoint(checkpoint_layers, x, use_reentrant=reentrant)
        return model.block3(h)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reentrant-bug config warns, by design
        with remat.MemoryTracker(module=model, count_existing=[model, x]) as mt:
            loss = w.loss_fn(run_blocks(x), w.targets)
        loss.backward()
    with_grad = sum(p.grad is not None for p in model.parameters())
    return {
        "config": config,
        "forward_peak": mt.peak_bytes,
        "saved": mt.saved_bytes,
        "cuda_max_allocated": mt.cuda_max_allocated,
        "cuda_max_reserved": mt.cuda_max_reserved,
        "params_with_grad": f"{with_grad}/{len(list(model.parameters()))}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3072)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # child process: measure one configuration, print JSON
        print(json.dumps(measure(args.worker, args.batch, args.device)))
        return

    results = []
    for config in args.configs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            config,
            "--batch",
            str(args.batch),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    cuda = args.device.startswith("cuda")
    head = f"{'config':<16} {'forward peak MB':>16} {'saved MB':>10} {'grads':>6}"
    print(f"TutorialMLP, batch {args.batch}, float32, {args.device} (forward, weights + input)")
    print(head + (f" {'cuda alloc MB':>14} {'cuda reserved MB':>17}" if cuda else ""))
    for r in results:
        line = (
            f"{r['config']:<16} {r['forward_peak'] / MB:>16.2f} {r['saved'] / MB:>10.2f} "
            f"{r['params_with_grad']:>6}"
        )
        if cuda:
            line += f" {r['cuda_max_allocated'] / MB:>14.2f} {r['cuda_max_reserved'] / MB:>17.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "device": args.device, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
