"""Engine overhead: remat's checkpoint against PyTorch's, per block of a GPT-style model.

For a 12-block GPT (d=256, 8 heads, seq 256, batch 8, float32, CPU by default) this times one
forward+backward step with no checkpointing, with ``torch.utils.checkpoint`` (non-reentrant)
on every block, and with both remat engines on every block. Time is reported as the median
of interleaved repeats (every round runs each configuration once, in a rotating order), as a
ratio to no checkpointing measured in the same run. It also counts, in bytes, what autograd
keeps for backward after the forward pass (unique storages seen by an outer
``saved_tensors_hooks``), which must be equal for PyTorch's checkpoint and remat's.

Run: ``python benchmarks/engine_overhead.py [--repeats 20] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.checkpoint
from _timing import interleaved_seconds, step_seconds

import remat
from remat.bench.workloads import build_workload

CONFIGS = ("none", "torch", "remat-hooks", "remat-function")


def _wrapper(config: str) -> Callable | None:
    if config == "torch":
        return lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
    if config == "remat-hooks":
        return lambda f, x: remat.checkpoint(f, x)
    if config == "remat-function":
        return lambda f, x: remat.checkpoint(f, x, engine="function")
    return None


def build(config: str, args: argparse.Namespace):
    workload = build_workload(
        "gpt",
        batch=args.batch,
        device=args.device,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        seq_len=args.seq_len,
    )
    wrap = _wrapper(config)
    if wrap is not None:
        for block in workload.model.blocks:
            block.forward = lambda x, f=block.forward, w=wrap: w(f, x)
    return workload


def kept_bytes(workload) -> int:
    """Bytes of the unique storages autograd holds for backward after the forward pass.

    Parameters are left out: they are in memory anyway (the Function engine saves
    references to them, which costs nothing).
    """
    params = {p.untyped_storage().data_ptr() for p in workload.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = workload.loss()
    loss.backward()
    workload.model.zero_grad(set_to_none=True)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "engine_overhead.json"
    )
    args = parser.parse_args(argv)

    workloads = {config: build(config, args) for config in CONFIGS}
    kept = {config: kept_bytes(w) for config, w in workloads.items()}
    times = interleaved_seconds(workloads, args.repeats, args.warmup, step_seconds)

    median = {config: statistics.median(ts) for config, ts in times.items()}
    rows = []
    print(f"{'configuration':<16}{'median step':>13}{'ratio to none':>15}{'kept after fwd':>17}")
    for config in CONFIGS:
        ratio = median[config] / median["none"]
        rows.append(
            {
                "config": config,
                "median_step_s": median[config],
                "ratio_to_none": ratio,
                "kept_bytes": kept[config],
                "step_s": times[config],
            }
        )
        print(
            f"{config:<16}{median[config] * 1e3:>10.1f} ms{ratio:>15.3f}"
            f"{kept[config] / 1e6:>14.2f} MB"
        )
    hooks_vs_torch = median["remat-hooks"] / median["torch"]
    print(f"\nremat hooks engine / PyTorch checkpoint: {hooks_vs_torch:.3f}")
    print(f"kept bytes equal to PyTorch's: {kept['remat-hooks'] == kept['torch']}")
    result = {
        "benchmark": "engine_overhead",
        "command": "python benchmarks/engine_overhead.py " + " ".join(argv or []),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": args.device,
            "threads": torch.get_num_threads(),
        },
        "model": {
            "layers": args.layers,
            "d_model": args.d_model,
            "heads": args.heads,
            "seq_len": args.seq_len,
            "batch": args.batch,
        },
        "repeats": args.repeats,
        "rows": rows,
        "remat_hooks_over_torch": hooks_vs_torch,
        "kept_bytes_equal": kept["remat-hooks"] == kept["torch"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
