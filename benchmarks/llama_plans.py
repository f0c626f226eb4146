"""Plans for Llama-3-8B- and 70B-shaped models on H100s with FSDP, predicted from this CPU.

Each model is built on the meta device (random-init shapes, nothing allocated) in bf16,
profiled once for ``target_device="h100"`` (predicted op times; flash attention and CUDA's
dropout as the GPU runs them), and seen as one rank of FSDP2 over ``--world-size`` ranks
(``remat.planner.sharding``). The budget is the H100's 80 GB: the training state (AdamW,
fp32 master weights, sharded) and the gathered parameters come off it first, the plan gets
the rest. Five plans per model:

- none: every layer stores what it saves;
- full: every layer recomputed (torchtitan's ``full`` AC, Megatron's full recompute);
- selective: every layer keeps its matmul and attention outputs (``save-matmuls``, the
  selective recompute of Korthikanti et al. 2022; torchtitan's ``selective op``);
- offload: every layer's saved tensors to host memory but its input (torchtune's activation
  offloading), costed by the transfer the compute does not hide (``problem.offload_cost``);
- remat: the chain planner's least-overhead plan within the budget (store, recompute,
  op-level or offload per layer).

Predicted peak per rank and step time (forward, twice that for backward, recomputation);
overhead is the recomputation (or the exposed transfer) over the step without it.

Run: ``python benchmarks/llama_plans.py [--json PATH] [--markdown]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import remat
from remat.bench.hf_workloads import build_hf_workload
from remat.measure.storage import unique_storage_bytes
from remat.planner.sharding import shard_profile, sharded_state
from remat.planner.training_state import training_state

GB = 10**9
BUDGET = 80 * GB  # an H100 SXM's memory
MODELS = {  # Llama 3 shapes (Meta's model cards): layers, hidden, MLP, heads, KV heads
    "llama3-8b": {"n_layers": 32, "d_model": 4096, "mlp": 14336, "heads": 32, "kv": 8},
    "llama3-70b": {"n_layers": 80, "d_model": 8192, "mlp": 28672, "heads": 64, "kv": 8},
}


def llama_workload(
    shape: dict, *, seq_len: int, batch: int = 1, device: str = "meta",
    dtype: torch.dtype = torch.bfloat16, vocab_size: int = 128256,
):  # fmt: skip
    """A Llama of ``shape`` (the keys of ``MODELS``), random weights seeded with 0."""
    return build_hf_workload(
        "llama", batch=batch, device=device, dtype=dtype, seed=0,
        n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["heads"],
        seq_len=seq_len, vocab_size=vocab_size,
        config={"intermediate_size": shape["mlp"], "num_key_value_heads": shape["kv"]},
    )  # fmt: skip


def plan_rows(name: str, world_size: int, seq_len: int) -> dict:
    start = time.perf_counter()
    w = llama_workload(MODELS[name], seq_len=seq_len)
    prof = remat.profile(w.model, *w.inputs, loss_fn=w.loss_of, target_device="h100")
    prof = shard_profile(prof, w.model, world_size)
    state = training_state(w.model, "adamw")
    rank = sharded_state(state, w.model, [r.name for r in prof.regions], world_size)
    resident = rank.total + unique_storage_bytes(w.tensors)
    left = BUDGET - resident
    n = len(prof.regions)
    plans = {  # predicted as remat.plan predicts: what lives beside the chain included
        "none": remat.plan_from_choices(prof, ["store"] * n),
        "full": remat.plan_from_choices(prof, ["recompute"] * n),
        "selective": remat.plan_from_choices(prof, ["save-matmuls"] * n),
        "offload": remat.plan_from_choices(prof, ["offload"] * n),
    }
    if left <= 0:
        plans["remat"] = f"no plan: the state alone takes {resident / GB:.1f} GB per rank"
    else:
        try:
            plans["remat"] = remat.plan(prof, left)
        except remat.BudgetError as e:
            plans["remat"] = str(e)
    plain = 3 * prof.forward_cost
    rows = []
    for label, p in plans.items():
        if isinstance(p, str):
            rows.append({"plan": label, "error": p})
            continue
        peak = p.predicted_peak_bytes + resident
        rows.append(
            {
                "plan": label,
                "peak_per_rank_bytes": peak,
                "fits": peak <= BUDGET,
                "step_seconds": plain + p.extra_cost,
                "overhead": p.extra_cost / plain,
            }
        )
    return {
        "model": name, "world_size": world_size, "seq_len": seq_len, "batch": 1,
        "state_per_rank_bytes": rank.shards, "gathered_bytes": rank.gathered,
        "left_for_the_step_bytes": left, "seconds_to_plan": time.perf_counter() - start,
        "rows": rows,
    }  # fmt: skip


def table(results: list[dict]) -> str:
    lines = [
        "| model | ranks | plan | peak per rank (GB) | fits 80 GB | step (s) | overhead |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in results:
        for row in r["rows"]:
            head = f"| {r['model']} | {r['world_size']} | {row['plan']} |"
            if "error" in row:
                lines.append(f"{head} {row['error']} | | | |")
                continue
            lines.append(
                f"{head} {row['peak_per_rank_bytes'] / GB:.1f} | "
                f"{'yes' if row['fits'] else 'no'} | {row['step_seconds']:.2f} | "
                f"{row['overhead']:.1%} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/llama_plans.json"))
    args = ap.parse_args()
    results = []
    for name, ranks in (("llama3-8b", 8), ("llama3-70b", 8), ("llama3-70b", 32)):
        r = plan_rows(name, ranks, args.seq_len)
        results.append(r)
        print(
            f"{name} over {ranks} ranks: state shards {r['state_per_rank_bytes'] / GB:.1f} GB, "
            f"gathered {r['gathered_bytes'] / GB:.1f} GB, left for the step "
            f"{r['left_for_the_step_bytes'] / GB:.1f} GB; planned in {r['seconds_to_plan']:.1f} s"
        )
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"torch": torch.__version__, "budget_bytes": BUDGET, "results": results}
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
