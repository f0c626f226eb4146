"""Every transformers causal LM trained under remat: exact, or an error that names the reason.

Each model type of transformers' causal-LM mapping is built from its default config with
tiny sizes (random weights, nothing downloaded) and trained for one step the way its users
call it (train mode, dropout on, ``use_cache`` as the config says, ``labels`` giving the
loss): once without remat, then under each treatment, and the loss, every gradient and every
buffer are compared bit for bit. Treatments: ``hf.enable`` (transformers' own checkpointing
hook, remat's engine), ``remat.every(1)`` (remat.apply on the repeated layers), and
``remat.ops("save-matmuls")`` on the replay and on the tape engine.

A result is ``exact``, ``error`` (a CheckpointError: remat refused, and says why),
``refused`` (hf.enable on a model without transformers' checkpointing hook), ``differs`` (a
wrong number without an error: must never happen) or ``crash`` (any other exception).
Architectures that do not build from a small config, or do not train without remat, are
listed apart.

Run (about 15 minutes on 2 CPU cores):
    python benchmarks/hf_sweep.py --jobs 2 --json benchmarks/results/hf_sweep.json
    python benchmarks/hf_sweep.py --archs llama,gpt2,qwen3_next   # a few
    python benchmarks/hf_sweep.py --from-json benchmarks/results/hf_sweep.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

TREATMENTS = ("hf.enable", "every(1)", "ops-replay", "ops-tape")
RESULTS = ("exact", "error", "refused", "differs", "crash")
SECONDS_PER_ARCH = 240
B, T = 2, 8

# Tiny sizes, set where the default config has the field and a larger value. Passed to
# the config's constructor, so fields derived from them (head_dim, layer_types) follow.
SIZES: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 4,  # hybrids put a full-attention layer every 4th (qwen3_next)
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    # encoder-decoder families built as decoders (bart, marian...)
    "encoder_layers": 2,
    "decoder_layers": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # linear attention and state-space layers
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 8,
    "num_heads": 4,
    # vision and audio towers of multimodal models
    "image_size": 32,
    "patch_size": 8,
    "num_mel_bins": 16,
}
HEAD_FIELDS = ("num_key_value_heads", "head_dim")
LATENT_FIELDS = (
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "kv_lora_rank",
    "q_lora_rank",
)
# Sizes tried in turn until the model builds and trains, as (fields left at their default,
# sizes changed): configs derive fields from each other in their own ways (head_dim from
# heads or from the rotary size), and hybrids with an attention layer every 8th need 8.
CANDIDATES: tuple[tuple[tuple[str, ...], dict[str, int]], ...] = (
    ((), {}),
    (HEAD_FIELDS, {}),
    (HEAD_FIELDS + LATENT_FIELDS, {}),
    (HEAD_FIELDS + LATENT_FIELDS, {"num_hidden_layers": 8}),
)
# Per-layer lists cut to the number of layers (a config validates their length).
PER_LAYER = ("layer_types", "layers_block_type", "block_types")
MAX_PARAMETERS = 30_000_000  # counted on the meta device before building for real


def _overrides(default: Any, leave_out: tuple[str, ...], sizes: dict[str, int]) -> dict[str, Any]:
    from transformers import PretrainedConfig

    overrides: dict[str, Any] = {}
    for name, value in {**SIZES, **sizes}.items():
        current = getattr(default, name, None)
        if name in leave_out or isinstance(current, bool) or not isinstance(current, int):
            continue
        if current > value:
            overrides[name] = value
    layers = overrides.get("num_hidden_layers")
    for name in PER_LAYER:
        current = getattr(default, name, None)
        derived = isinstance(getattr(type(default), name, None), property)
        if layers and not derived and isinstance(current, (list, tuple)) and len(current) > layers:
            overrides[name] = list(current[:layers])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if isinstance(getattr(default, key, None), int):
            overrides[key] = {"pad_token_id": 0, "bos_token_id": 1}.get(key, 2)
    for name in getattr(default, "sub_configs", {}):  # text, vision, audio configs
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig):
            small = _overrides(sub, leave_out, sizes)
            overrides[name] = type(sub)(**{**sub.to_dict(), **small})
    return overrides


def small_config(arch: str, candidate: int = 0) -> Any:
    from transformers import AutoConfig

    default = AutoConfig.for_model(arch)
    return AutoConfig.for_model(arch, **_overrides(default, *CANDIDATES[candidate]))


def build(arch: str, candidate: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    config = small_config(arch, candidate)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise MemoryError(f"{parameters / 1e6:.0f}M parameters at the small sizes")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def train_step(model: Any, ids: Any) -> tuple[Any, dict[str, Any], list[Any]]:
    """Loss, gradients by name and buffers after one training step."""
    import torch

    torch.manual_seed(1)  # the same dropout masks in every run
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, [b.clone() for b in model.buffers()]


def apply_treatment(model: Any, name: str) -> None:
    import remat
    from remat.integrations import hf

    if name == "hf.enable":
        hf.enable(model)
    elif name == "every(1)":
        remat.apply(model, remat.every(1))
    elif name == "ops-replay":
        remat.apply(model, remat.ops("save-matmuls"))
    else:
        remat.apply(model, remat.ops("save-matmuls", engine="tape"))
    if name != "hf.enable" and not remat.applied(model):
        raise LookupError("remat.apply found no repeated layers")


def _difference(got: Any, want: Any) -> str | None:
    """Where two (loss, grads, buffers) differ, or None when they are bitwise equal."""
    import torch

    loss, grads, buffers = got
    want_loss, want_grads, want_buffers = want
    if not torch.equal(loss, want_loss):
        return f"loss {loss.item():.8g} != {want_loss.item():.8g}"
    for name, g in grads.items():
        w = want_grads[name]
        if (g is None) != (w is None):
            return f"gradient of {name}: {'None' if g is None else 'set'} vs reference"
        if g is not None and not torch.equal(g, w):
            diff = (g.double() - w.double()).abs().max().item()
            return f"gradient of {name} off by up to {diff:.3g}"
    for k, (b, w) in enumerate(zip(buffers, want_buffers)):
        if not torch.equal(b, w):
            return f"buffer #{k} differs"
    return None


def sweep_arch(arch: str) -> dict[str, Any]:
    import torch

    import remat

    row: dict[str, Any] = {"arch": arch, "treatments": {}}
    for candidate in range(len(CANDIDATES)):
        try:
            reference = build(arch, candidate)
        except Exception as err:
            row.update(status="does not build", detail=_line(err))
            continue
        vocab = reference.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(2))
        try:
            want = train_step(copy.deepcopy(reference), ids)
            # transformers turns the KV cache off under its own checkpointing, and with it
            # on some models run other kernels (gpt2's tied embedding sums its gradient in
            # another order): hf.enable is compared with the model trained that way.
            no_cache = copy.deepcopy(reference)
            no_cache.config.use_cache = False
            want_without_cache = train_step(no_cache, ids)
        except Exception as err:
            row.update(status="does not train", detail=_line(err))
            continue
        parameters = sum(p.numel() for p in reference.parameters())
        row.update(status="trains", detail="", parameters=parameters)
        break
    if row["status"] != "trains":
        return row
    for name in TREATMENTS:
        model = copy.deepcopy(reference)
        try:
            apply_treatment(model, name)
            got = train_step(model, ids)
        except remat.CheckpointError as err:
            row["treatments"][name] = {"result": "error", "detail": _line(err)}
            continue
        except remat.RematError as err:
            row["treatments"][name] = {"result": "refused", "detail": _line(err)}
            continue
        except Exception as err:
            row["treatments"][name] = {"result": "crash", "detail": _line(err)}
            continue
        difference = _difference(got, want_without_cache if name == "hf.enable" else want)
        row["treatments"][name] = (
            {"result": "exact"}
            if difference is None
            else {"result": "differs", "detail": difference}
        )
    return row


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"more than {SECONDS_PER_ARCH} s")


def worker(archs: list[str]) -> None:
    """Sweep ``archs`` in this process, one JSON line each on stdout."""
    import logging

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGALRM, _alarm)
    for arch in archs:
        signal.alarm(SECONDS_PER_ARCH)
        try:
            row = sweep_arch(arch)
        except BaseException as err:
            row = {"arch": arch, "status": "sweep failed", "detail": _line(err)}
            traceback.print_exc(file=sys.stderr)
        finally:
            signal.alarm(0)
        print(json.dumps(row), flush=True)


def run_workers(archs: list[str], jobs: int) -> list[dict[str, Any]]:
    """Sweep ``archs`` over ``jobs`` worker processes; a worker that dies (a segfault)
    loses only the architecture it was on."""
    pending = [archs[i::jobs] for i in range(jobs)]
    rows: dict[str, dict[str, Any]] = {}
    while any(pending):
        procs = []
        for part in pending:
            if part:
                cmd = [sys.executable, __file__, "--worker", ",".join(part)]
                procs.append((part, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        pending = []
        for part, proc in procs:
            out, _ = proc.communicate()
            done = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for row in done:
                rows[row["arch"]] = row
                print(_progress(row), flush=True)
            left = part[len(done) :]
            if left:  # it died on left[0]
                rows[left[0]] = {
                    "arch": left[0],
                    "status": "sweep failed",
                    "detail": f"worker exited with {proc.returncode}",
                }
                pending.append(left[1:])
    return [rows[a] for a in archs if a in rows]


def _progress(row: dict[str, Any]) -> str:
    results = " ".join(f"{k}={v['result']}" for k, v in row.get("treatments", {}).items())
    return f"{row['arch']:<28} {row['status']:<15} {results or row.get('detail', '')}"


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    trained = [r for r in rows if r["status"] == "trains"]
    counts = {t: Counter(r["treatments"][t]["result"] for r in trained) for t in TREATMENTS}
    return {
        "architectures": len(rows),
        "train without remat": len(trained),
        "do not build": sum(r["status"] == "does not build" for r in rows),
        "do not train": sum(r["status"] == "does not train" for r in rows),
        "sweep failed": sum(r["status"] == "sweep failed" for r in rows),
        "by treatment": {t: dict(counts[t]) for t in TREATMENTS},
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = summary(rows)
    lines = [
        f"{s['architectures']} causal-LM types in transformers {meta['transformers']} "
        f"(torch {meta['torch']}); {s['train without remat']} build from a small config and "
        f"train without remat ({s['do not build']} do not build, {s['do not train']} do not "
        "train).",
        "",
        "| treatment | " + " | ".join(RESULTS) + " |",
        "| --- | " + " | ".join("---:" for _ in RESULTS) + " |",
    ]
    for t in TREATMENTS:
        by = s["by treatment"][t]
        lines.append(f"| {t} | " + " | ".join(str(by.get(r, 0)) for r in RESULTS) + " |")
    groups: dict[tuple[str, str], list[str]] = {}
    example: dict[tuple[str, str], str] = {}
    for r in rows:
        for t, v in r.get("treatments", {}).items():
            if v["result"] != "exact":
                groups.setdefault((t, v["result"]), []).append(r["arch"])
                example.setdefault((t, v["result"]), v.get("detail", ""))
    if groups:
        lines += ["", "Not exact:", ""]
        lines += [
            f"- {t} {result}: {', '.join(archs)} (e.g. {example[(t, result)][:120]})"
            for (t, result), archs in sorted(groups.items())
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", help="comma-separated model types (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--json", type=Path, help="write the rows and summary here")
    parser.add_argument("--from-json", type=Path, help="print a saved sweep instead of running")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker.split(","))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        rows, meta = data["rows"], data["meta"]
    else:
        import torch
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = args.archs.split(",") if args.archs else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        start = time.perf_counter()
        rows = run_workers(archs, max(1, args.jobs))
        meta = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python benchmarks/hf_sweep.py " + " ".join(sys.argv[1:]),
        }
    print(json.dumps(summary(rows), indent=2))
    if args.markdown:
        print(markdown(rows, meta))
    if args.json:
        data = {"meta": meta, "summary": summary(rows), "rows": rows}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    wrong = sum(v["result"] == "differs" for r in rows for v in r.get("treatments", {}).values())
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
