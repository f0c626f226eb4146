"""The planner across the transformers zoo: each plan's predicted step peak against its measured.

Every causal-LM type of transformers that builds and trains from a small config (as
``hf_sweep.py`` builds them: random weights, nothing downloaded), and four other tasks
(``EXTRAS``: BERT as a masked LM, T5 and Whisper as seq2seq, ViT as an image classifier), is
profiled on CPU with ``remat.profile`` and planned: ``remat.plan`` at 30%, 50% and 75% of the
un-checkpointed step's peak, and four hand-made plans (``remat.plan_from_choices``): every
region stored, every region recomputed, every second one, the last one only. Each plan is
applied to a fresh copy of the model and one training step measured the way the profile
measures (new bytes at the peak: parameters and inputs aside), with the dropout masks of the
un-checkpointed reference step, whose loss, gradients and buffers it must match bit for bit.
The same model is profiled on the meta device too (for the CPU target: its kernels), and its
regions' input, saved and output bytes compared with the CPU profile's.

A profile is ``profiled``, ``plan error`` (a PlanError: remat refused, and says why) or
``crash`` (any other exception: must never happen). The exit code is 1 on a crash, a plan
measured above its prediction, a wrong gradient or a meta profile that differs from the CPU
one, so the sweep can gate a change.

Run (one process per architecture, ``--jobs`` at once):
    python benchmarks/plan_sweep.py --archs bert,gpt2,llama          # bert: both tasks
    python benchmarks/plan_sweep.py --jobs 2 --json benchmarks/results/plan_sweep.json
    python benchmarks/plan_sweep.py --from-json benchmarks/results/plan_sweep.json --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hf_sweep import CANDIDATES, MAX_PARAMETERS, _difference, _line, _overrides, build

import remat
from remat.measure.training_call import training_call
from remat.profiling.step import measure_step_peak

B, T = 2, 32
BUDGETS = ("30%", "50%", "75%")
KINDS = ("block", "op", "offload")  # plan_kind
FIELDS = ("input_bytes", "saved_bytes", "output_bytes")  # compared between meta and CPU
SECONDS_PER_ARCH = 300
# Sizes of the extras' configs that hf_sweep's SIZES do not name (T5 and Whisper spell them
# their own way); Whisper's encoder takes exactly 2 * max_source_positions frames.
EXTRA_SIZES = {
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 8,
    "num_layers": 4,
    "max_source_positions": 16,
    "max_target_positions": 64,
}


def _ids(config: Any) -> torch.Tensor:
    vocab = config.get_text_config().vocab_size
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(2))


def _lm_inputs(config: Any) -> dict[str, Any]:
    ids = _ids(config)
    return {"input_ids": ids, "labels": ids}


def _image_inputs(config: Any) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(2)
    shape = (B, config.num_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_labels, (B,), generator=generator)
    return {"pixel_values": torch.randn(shape, generator=generator), "labels": labels}


def _speech_inputs(config: Any) -> dict[str, Any]:
    shape = (B, config.num_mel_bins, 2 * config.max_source_positions)  # (B, mels, frames)
    features = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return {"input_features": features, "labels": _ids(config)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Extra:
    """A model that is not a causal LM: its config's type, the transformers auto class that
    builds it for its task, and its keyword inputs (with ``labels``, so it returns a loss)."""

    model_type: str
    auto_class: str
    inputs: Callable[[Any], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


EXTRAS = {
    "bert:masked-lm": Extra(
        model_type="bert", auto_class="AutoModelForMaskedLM", inputs=_lm_inputs
    ),
    # T5 starts its decoder from the pad token; its config leaves the field out
    "t5:seq2seq": Extra(
        model_type="t5",
        auto_class="AutoModelForSeq2SeqLM",
        inputs=_lm_inputs,
        config={"decoder_start_token_id": 0},
    ),
    "vit:image-classification": Extra(
        model_type="vit", auto_class="AutoModelForImageClassification", inputs=_image_inputs
    ),
    "whisper:seq2seq": Extra(
        model_type="whisper", auto_class="AutoModelForSpeechSeq2Seq", inputs=_speech_inputs
    ),
}


def loss_of(out: Any) -> torch.Tensor:
    return out.loss


def called_once(model: Any, kwargs: dict[str, Any]) -> None:
    """A model may change itself on its first call (BigBird swaps its block-sparse attention
    for full attention on short sequences, new modules drawn from the RNG): once, before
    its reference, so that the reference, the profile and every plan run the same model."""
    with torch.no_grad(), training_call(model):
        model(**kwargs)


def build_workload(name: str, candidate: int) -> tuple[Any, dict[str, Any]]:
    """The model (train mode) and its keyword inputs."""
    import transformers

    if name not in EXTRAS:
        model = build(name, candidate)  # hf_sweep's causal LM
        return model, _lm_inputs(model.config)
    extra = EXTRAS[name]
    auto = getattr(transformers, extra.auto_class)
    default = transformers.AutoConfig.for_model(extra.model_type)
    leave_out, sizes = CANDIDATES[candidate]
    overrides = _overrides(default, leave_out, {**EXTRA_SIZES, **sizes})
    config = transformers.AutoConfig.for_model(extra.model_type, **overrides, **extra.config)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in auto.from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise MemoryError(f"{parameters / 1e6:.0f}M parameters at the small sizes")
    torch.manual_seed(0)
    return auto.from_config(config).train(), extra.inputs(config)


def measured_step(model: Any, kwargs: dict[str, Any]) -> tuple[int, tuple[Any, ...]]:
    """One training step measured as the profile measures it (KV cache off, new bytes at
    the peak), and its (loss, gradients by name, buffers) for ``hf_sweep._difference``.

    The gradients are the step's own tensors, taken as they are accumulated: no copy is made
    while the step is measured, and ``measure_step_peak`` clears ``.grad`` afterwards."""
    grads: dict[str, Any] = {}
    losses: list[torch.Tensor] = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda p, n=name: grads.__setitem__(n, p.grad))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]

    def loss_fn(out: Any) -> torch.Tensor:
        loss = loss_of(out)
        losses.append(loss.detach())
        return loss

    torch.manual_seed(1)  # the reference's dropout masks in every run
    try:
        with training_call(model):
            peak = measure_step_peak(model, (), loss_fn, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    by_name = {name: grads.get(name) for name, _ in model.named_parameters()}
    return peak, (losses[0], by_name, [b.clone() for b in model.buffers()])


def plan_kind(plan: remat.Plan) -> str:
    actions = {r.action for r in plan.regions}
    return "op" if "ops" in actions else "offload" if "offload" in actions else "block"


def hand_made_choices(prof: remat.Profile) -> dict[str, tuple[list[str], list[str]]]:
    """Per hand-made plan: its choices, and the regions it would recompute whose menu has
    no ``recompute`` (stored instead)."""
    n = len(prof.regions)
    wanted = {
        "store-all": [False] * n,
        "all-recompute": [True] * n,
        "alternating": [i % 2 == 1 for i in range(n)],
        "last-only": [i == n - 1 for i in range(n)],
    }
    menus = [{o.name for o in r.menu()} for r in prof.to_chain().regions]
    out = {}
    for name, recompute in wanted.items():
        can = [r and "recompute" in menu for r, menu in zip(recompute, menus)]
        skipped = [prof.regions[i].name for i, r in enumerate(recompute) if r and not can[i]]
        out[name] = (["recompute" if c else "store" for c in can], skipped)
    return out


def _crash(err: BaseException) -> str:
    """The last lines of the traceback, after the innermost line of remat it passed through
    (where remat called into the code that raised)."""
    lines = "".join(traceback.format_exception(err)).strip().splitlines()
    package = os.path.dirname(remat.__file__) + os.sep
    ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(package)]
    if not ours:
        return "\n".join(lines[-6:])
    f = ours[-1]
    where = f"remat at {f.filename.removeprefix(package)}:{f.lineno} ({f.name}): {f.line}"
    return "\n".join([where, *lines[-6:]])


def make_plans(prof: remat.Profile) -> list[tuple[str, remat.Plan | None, dict[str, Any]]]:
    """(name, plan or None, what is recorded when there is no plan to measure)."""
    plans: list[tuple[str, remat.Plan | None, dict[str, Any]]] = []
    for budget in BUDGETS:
        try:
            plans.append((budget, remat.plan(prof, budget), {}))
        except remat.BudgetError as err:
            plans.append((budget, None, {"status": "infeasible", "detail": _line(err)}))
        except Exception as err:
            plans.append((budget, None, {"status": "crash", "detail": _crash(err)}))
    for name, (choices, skipped) in hand_made_choices(prof).items():
        note = {"skipped": skipped} if skipped else {}
        if skipped and "recompute" not in choices:
            plans.append((name, None, {"status": "skipped", **note}))
            continue
        try:
            plans.append((name, remat.plan_from_choices(prof, choices), note))
        except Exception as err:
            plans.append((name, None, {"status": "crash", "detail": _crash(err), **note}))
    return plans


def measure_plan(
    model: Any, kwargs: dict[str, Any], plan: remat.Plan, want: tuple[Any, ...]
) -> dict[str, Any]:
    """Apply ``plan`` to a fresh copy of ``model``, measure a step, compare with ``want``."""
    row: dict[str, Any] = {
        "kind": plan_kind(plan),
        "choices": list(plan.choices),
        "segments": [list(s) for s in plan.segments],
    }
    copied = copy.deepcopy(model)
    try:
        store = remat.CpuStore() if row["kind"] == "offload" else None
        remat.apply_plan(copied, plan, offload_store=store)
        measured, got = measured_step(copied, kwargs)
    except remat.RematError as err:
        return {**row, "status": "refused", "detail": _line(err)}
    except Exception as err:
        return {**row, "status": "crash", "detail": _crash(err)}
    predicted = plan.predicted_peak_bytes
    difference = _difference(got, want)
    return {
        **row,
        "status": "measured",
        "predicted": predicted,
        "measured": measured,
        "excess": measured - predicted,
        "excess_pct": round(100 * (measured - predicted) / predicted, 2) if predicted else None,
        "exact": difference is None,
        **({"difference": difference} if difference else {}),
    }


def compare_meta(prof: remat.Profile, model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Profile the same model on the meta device for the CPU (its kernels: flash attention
    where the CPU would take it); where its regions' bytes differ."""
    try:
        with torch.device("meta"):  # the same class: a composite's text model stays one
            meta_model = type(model)._from_config(copy.deepcopy(model.config)).train()
        meta = remat.profile(meta_model, loss_fn=loss_of, target_device="cpu", **kwargs)
    except remat.PlanError as err:
        return {"status": "plan error", "detail": _line(err)}
    except Exception as err:
        return {"status": "crash", "detail": _crash(err)}
    cpu_names = [r.name for r in prof.regions]
    meta_names = [r.name for r in meta.regions]
    if cpu_names != meta_names:
        difference = {"region": "*", "field": "regions", "cpu": cpu_names, "meta": meta_names}
        return {"status": "differs", "differences": [difference]}
    differences = [
        {"region": c.name, "field": f, "cpu": getattr(c, f), "meta": getattr(m, f)}
        for c, m in zip(prof.regions, meta.regions)
        for f in FIELDS
        if getattr(c, f) != getattr(m, f)
    ]
    return {"status": "differs" if differences else "equal", "differences": differences}


def sweep_arch(name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": name}
    for candidate in range(len(CANDIDATES)):
        try:
            model, kwargs = build_workload(name, candidate)
        except Exception as err:
            row.update(status="does not build", detail=_line(err))
            continue
        try:
            called_once(model, kwargs)
            reference_peak, want = measured_step(copy.deepcopy(model), kwargs)
        except Exception as err:
            row.update(status="does not train", detail=_line(err))
            continue
        row.update(parameters=sum(p.numel() for p in model.parameters()))
        row.update(reference_peak=reference_peak)
        break
    if "reference_peak" not in row:
        return row
    try:
        prof = remat.profile(model, loss_fn=loss_of, **kwargs)
    except remat.PlanError as err:
        return {**row, "status": "plan error", "detail": _line(err)}
    except Exception as err:
        return {**row, "status": "crash", "detail": _crash(err)}
    row.update(status="profiled", detail="", regions=len(prof.regions))
    row.update(step_peak=prof.step_peak_bytes, outside=prof.outside_bytes, plans={})
    for plan_name, plan, record in make_plans(prof):
        if plan is not None:
            record = {**record, **measure_plan(model, kwargs, plan, want)}
        row["plans"][plan_name] = record
    row["meta"] = compare_meta(prof, model, kwargs)
    return row


def worker(name: str) -> None:
    """Sweep one architecture in this process; its row as the last line of stdout."""
    torch.set_num_threads(1)  # one order of summation: gradients compared bit for bit
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    try:
        row = sweep_arch(name)
    except BaseException as err:
        row = {"arch": name, "status": "crash", "detail": _crash(err)}
    print(json.dumps(row), flush=True)


def run_one(name: str, timeout: float) -> dict[str, Any]:
    """Sweep ``name`` in a process of its own: a segfault or a hang loses only it."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--worker", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"arch": name, "status": "timeout", "detail": f"more than {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = "\n".join(done.stderr.strip().splitlines()[-6:])
    return {"arch": name, "status": "crash", "detail": f"exit {done.returncode}: {tail}"}


def run_sweep(names: list[str], jobs: int, timeout: float) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, name, timeout) for name in names]
        for future in as_completed(futures):
            row = future.result()
            rows[row["arch"]] = row
            print(progress(row), flush=True)
    return [rows[n] for n in names]


def select(archs: str | None) -> list[str]:
    """Every causal-LM type and extra, or those ``archs`` names (a bare model type selects
    its causal LM and its extras: ``bert`` is BERT's causal LM and its masked LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    every = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + list(EXTRAS)
    if not archs:
        return every
    names = []
    for wanted in archs.split(","):
        found = [n for n in every if wanted in (n, n.split(":")[0])]
        names += [n for n in found or [wanted] if n not in names]
    return names


def short(detail: str) -> str:
    """An error's last line, and where remat was when it raised (``_crash``)."""
    lines = detail.strip().splitlines() or [""]
    where = lines[0].split(": ")[0] if lines[0].startswith("remat at ") else ""
    return f"{lines[-1]} ({where})" if where else lines[-1]


def measured_plans(rows: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (r["arch"], name, p)
        for r in rows
        for name, p in r.get("plans", {}).items()
        if p["status"] == "measured"
    ]


def progress(row: dict[str, Any]) -> str:
    plans = measured_plans([row])
    over = sum(p["excess"] > 0 for _, _, p in plans)
    wrong = sum(not p["exact"] for _, _, p in plans)
    if row["status"] != "profiled":
        return f"{row['arch']:<28} {row['status']:<15} {short(row.get('detail', ''))[:300]}"
    meta = row["meta"]["status"]
    return (
        f"{row['arch']:<28} {row['status']:<15} {len(plans)} plans measured, {over} over "
        f"prediction, {wrong} wrong gradients; meta {meta}"
    )


def plan_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'arch':<26} {'plan':<14} {'kind':<6} {'predicted':>11} {'measured':>11}"
    lines = [f"{head} {'excess':>10} {'%':>7}  gradients"]
    for r in rows:
        for name, p in r.get("plans", {}).items():
            if p["status"] != "measured":
                text = f"{r['arch']:<26} {name:<14} {p['status']}: {short(p.get('detail', ''))}"
                lines.append(text[:140])
                continue
            pct = "" if p["excess_pct"] is None else f"{p['excess_pct']:+.1f}"
            lines.append(
                f"{r['arch']:<26} {name:<14} {p['kind']:<6} {p['predicted']:>11,} "
                f"{p['measured']:>11,} {p['excess']:>+10,} {pct:>7}  "
                + ("exact" if p["exact"] else p["difference"])
            )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    plans = measured_plans(rows)
    statuses = [p["status"] for r in rows for p in r.get("plans", {}).values()]
    over = [(a, n, p) for a, n, p in plans if p["excess"] > 0]
    by_pct = [x for x in over if x[2]["excess_pct"] is not None]

    def worst(key: str, among: list[Any]) -> dict[str, Any] | None:
        if not among:
            return None
        arch, name, p = max(among, key=lambda x: x[2][key])
        return {"arch": arch, "plan": name, "bytes": p["excess"], "pct": p["excess_pct"]}

    over_at: dict[str, str] = {}
    for arch, name, p in over:
        text = f"{name} {p['excess']:+,} B"
        over_at[arch] = f"{over_at[arch]}, {text}" if arch in over_at else text
    under_at: dict[str, str] = {}  # block-level plans predicted above their measured peak
    for arch, name, p in plans:
        if p["kind"] == "block" and p["excess"] < 0:
            text = f"{name} {p['excess']:+,} B"
            under_at[arch] = f"{under_at[arch]}, {text}" if arch in under_at else text
    profiled = [r for r in rows if r["status"] == "profiled"]
    # A meta run that refuses with a PlanError naming what it cannot know (routing computed
    # from the weights) answers as a CPU profile's PlanError does: said, not wrong.
    meta_differs = {
        r["arch"]: _meta_difference(r["meta"])
        for r in profiled
        if r["meta"]["status"] not in ("equal", "plan error")
    }
    refused = [r for r in profiled if r["meta"]["status"] == "plan error"]
    meta_refused = {r["arch"]: short(r["meta"]["detail"]) for r in refused}
    return {
        "architectures": len(rows),
        "by status": {s: sum(r["status"] == s for r in rows) for s in _statuses(rows)},
        "plans measured": len(plans),
        "plans not measured": {s: statuses.count(s) for s in sorted(set(statuses) - {"measured"})},
        "over prediction": {kind: sum(p["kind"] == kind for _, _, p in over) for kind in KINDS},
        "over prediction at": over_at,
        "block-level exact": sum(p["kind"] == "block" and p["excess"] == 0 for _, _, p in plans),
        "block-level measured": sum(p["kind"] == "block" for _, _, p in plans),
        "block-level above measured": under_at,
        "worst excess (bytes)": worst("excess", over),
        "worst excess (%)": worst("excess_pct", by_pct),
        "wrong gradients": [f"{a} {n}: {p['difference']}" for a, n, p in plans if not p["exact"]],
        "meta = CPU": sum(r["meta"]["status"] == "equal" for r in profiled),
        "meta differs": meta_differs,
        "meta refused (PlanError)": meta_refused,
        "crashes": {r["arch"]: short(r["detail"]) for r in rows if r["status"] == "crash"}
        | {
            f"{r['arch']} {n}": short(p["detail"])
            for r in rows
            for n, p in r.get("plans", {}).items()
            if p["status"] == "crash"
        },
    }


def _meta_difference(meta: dict[str, Any]) -> str:
    """A meta comparison in a line: per field, how many regions differ and the first one."""
    if meta["status"] != "differs":
        return f"{meta['status']}: {short(meta['detail'])}"
    by_field: dict[str, list[dict[str, Any]]] = {}
    for d in meta["differences"]:
        by_field.setdefault(d["field"], []).append(d)
    return "; ".join(
        f"{field} of {len(ds)} region(s), e.g. {ds[0]['region']}: cpu {ds[0]['cpu']}, "
        f"meta {ds[0]['meta']}"
        for field, ds in by_field.items()
    )


def _statuses(rows: list[dict[str, Any]]) -> list[str]:
    known = ["profiled", "plan error", "crash", "does not train", "does not build", "timeout"]
    return known + sorted({r["status"] for r in rows} - set(known))


def gate(s: dict[str, Any]) -> bool:
    """True when the sweep found something that must not happen."""
    over = sum(s["over prediction"].values())
    above = s["block-level above measured"]  # block-level plans are exact to the byte
    return bool(s["crashes"] or over or above or s["wrong gradients"] or s["meta differs"])


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = summary(rows)
    by = s["by status"]
    lines = [
        f"{s['architectures']} models of transformers {meta['transformers']} (torch "
        f"{meta['torch']}), profiled on CPU: `{meta['command']}`",
        "",
        "| | count |",
        "| --- | ---: |",
        *(f"| {status} | {count} |" for status, count in by.items() if count),
        f"| plans measured | {s['plans measured']} |",
        *(f"| plans {k} | {v} |" for k, v in s["plans not measured"].items()),
        f"| plans over their prediction | {sum(s['over prediction'].values())} |",
        *(f"| over prediction, {k}-level | {v} |" for k, v in s["over prediction"].items() if v),
        f"| block-level plans exact to the byte | {s['block-level exact']} of "
        f"{s['block-level measured']} |",
        f"| wrong gradients | {len(s['wrong gradients'])} |",
        f"| meta = CPU | {s['meta = CPU']} of {by.get('profiled', 0)} |",
        f"| meta refused with a PlanError | {len(s['meta refused (PlanError)'])} |",
    ]
    for key in ("worst excess (bytes)", "worst excess (%)"):
        w = s[key]
        if w:
            lines.append(f"| {key} | {w['arch']} {w['plan']}: {w['bytes']:+,} B ({w['pct']}%) |")
    apart = [r for r in rows if r["status"] not in ("profiled", "plan error", "crash")]
    for title, items in (
        ("Over prediction", [f"{a}: {t}" for a, t in s["over prediction at"].items()]),
        (
            "Block-level plans predicted above their measured peak (safe, not exact)",
            [f"{a}: {t}" for a, t in s["block-level above measured"].items()],
        ),
        ("Wrong gradients", s["wrong gradients"]),
        ("Meta differs", [f"{a}: {d[:300]}" for a, d in s["meta differs"].items()]),
        ("Meta refused", [f"{a}: {d}" for a, d in s["meta refused (PlanError)"].items()]),
        ("Crashes", [f"{a}: {d[:200]}" for a, d in s["crashes"].items()]),
        ("PlanError", [f"{r['arch']}: {r['detail']}" for r in rows if r["status"] == "plan error"]),
        ("Not profiled", [f"{r['arch']} ({r['status']}): {short(r['detail'])}" for r in apart]),
    ):
        if items:
            lines += ["", f"{title}:", "", *(f"- {item}" for item in items)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    head, _, runs = __doc__.partition("Run (")
    parser = argparse.ArgumentParser(
        description=head.split("\n\n")[0],
        epilog="Run (" + runs,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--archs", help="comma-separated model types or extras; default: every one")
    add("--jobs", type=int, default=2, help="architectures swept at once (a process each)")
    add("--timeout", type=float, default=SECONDS_PER_ARCH, help="seconds per architecture")
    add("--json", type=Path, metavar="PATH", help="save the rows and the summary to PATH")
    add("--from-json", type=Path, metavar="PATH", help="summarise a saved sweep, run none")
    add("--markdown", action="store_true", help="print the summary as a markdown table")
    add("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the sweep; its rows (the per-plan table printed) and what it ran on."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    start = time.perf_counter()
    rows = run_sweep(select(args.archs), max(1, args.jobs), args.timeout)
    print(plan_table(rows))
    return rows, {
        "command": "python benchmarks/plan_sweep.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, meta = saved["rows"], saved["meta"]
    else:
        rows, meta = sweep(args)
    s = summary(rows)
    print(json.dumps(s, indent=2))
    if args.markdown:
        print(markdown(rows, meta))
    if args.json:
        saved = {"meta": meta, "summary": s, "rows": rows}
        args.json.write_text(json.dumps(saved, indent=1) + "\n")
    return 1 if gate(s) else 0


if __name__ == "__main__":
    sys.exit(main())
