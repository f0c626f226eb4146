"""remat's byte count of a Megatron GPT layer against Korthikanti et al. 2022.

The paper ("Reducing Activation Recomputation in Large Transformer Models", section 4.1)
counts a layer's activations in 16-bit with one-byte dropout masks: ``s·b·h·(34 + 5·a·s/h)``
bytes without recomputation and ``34·s·b·h`` with the attention core (Q Kᵀ, softmax, its
dropout, attention over V) recomputed. The layer (``remat.bench.megatron_layer``) is built on
meta in fp16 and counted by ``remat.estimate`` twice: for ``target_device="h100"`` (CUDA's
kernels: one-byte dropout masks) and without a target (meta's kernels, as the CPU's: dropout
masks in fp16). Nothing is allocated, so the paper's own sizes run in seconds.

Run: ``python benchmarks/korthikanti.py [--json PATH] [--markdown]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import remat
from remat.bench.megatron_layer import MegatronLayer, layer_input, paper_bytes

# (s, b, h, a): the issue's, GPT-3 175B's attention shape at b=1, and a 22B-like layer
SHAPES = [(2048, 2, 1024, 16), (2048, 1, 12288, 96), (2048, 4, 6144, 64)]


def measure(s: int, b: int, h: int, a: int) -> list[dict]:
    with torch.device("meta"):
        layer = MegatronLayer(h, a).half()
    x = layer_input(s, b, h)
    rows = []
    for recompute in (False, True):
        core = ["core"] if recompute else None
        paper = paper_bytes(s, b, h, a, recompute)
        for target in ("h100", None):
            got = remat.estimate(layer, x, checkpoint_modules=core, target_device=target)
            rows.append(
                {
                    **{"s": s, "b": b, "h": h, "a": a},
                    "recompute": "attention core" if recompute else "none",
                    "target": target or "meta kernels",
                    "paper_bytes": paper,
                    "remat_bytes": got.saved_bytes,
                    "ratio": got.saved_bytes / paper,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = "| s, b, h, a | recomputed | counted for | paper MB | remat MB | remat / paper |"
    lines = [head, "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['s']}, {r['b']}, {r['h']}, {r['a']} | {r['recompute']} | {r['target']} | "
            f"{r['paper_bytes'] / 1e6:,.1f} | {r['remat_bytes'] / 1e6:,.1f} | {r['ratio']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/korthikanti.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows = [r for shape in SHAPES for r in measure(*shape)]
    print(table(rows))
    if not args.markdown:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"torch": torch.__version__, "rows": rows}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
