"""``remat bench``: memory, time and FLOPs of checkpointing configurations, side by side.

Each configuration runs in its own worker process (``python -m remat.bench.worker``), so one
configuration's allocations never show up in another's figures. The parent drives the workers
round-robin over pipes: every worker first measures memory, FLOPs and gradients, then does a
warm-up step, then ``steps`` rounds in which each worker times one training step. Timing is
therefore interleaved, and machine noise hits every configuration alike.

``none`` is always run: it is the reference for gradients, the time ratio and extra FLOPs.

Example:
    >>> from remat.bench.runner import BenchOptions, run_bench
    >>> result = run_bench(BenchOptions(model="mlp", batch=64, steps=3))  # doctest: +SKIP
    >>> result.failed  # doctest: +SKIP
    []
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import remat
from remat.bench.configurations import (
    CONFIGS,
    BenchConfig,
    default_config_names,
    parse_configs,
    policy_config,
    register_config,
)
from remat.bench.model_choice import DTYPES, check_model, check_model_options, effective_sizes
from remat.bench.worker import WorkerProcess
from remat.errors import MissingExtraError
from remat.measure.comparison import close, compare_tensors

__all__ = [
    "CONFIGS",
    "BenchConfig",
    "BenchOptions",
    "BenchResult",
    "ConfigResult",
    "Environment",
    "MissingExtraError",
    "NOISY_SPREAD",
    "check_options",
    "compare_grads",
    "compare_tensors",
    "default_config_names",
    "parse_configs",
    "policy_config",
    "register_config",
    "run_bench",
    "time_spread",
]

SCHEMA = "remat.bench/1"
NOISY_SPREAD = 2.0  # a repeat this many times the median: the machine was busy


def time_spread(times: list[float]) -> float:
    """``max(times) / median(times)``: 1.0 for steady repeats."""
    median = statistics.median(times)
    return max(times) / median if median > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Results.


@dataclass(kw_only=True)
class Environment:
    """Where and on what the benchmark ran (the JSON's ``environment``)."""

    remat_version: str
    torch_version: str
    python: str
    platform: str
    device: str
    device_name: str
    dtype: str
    model: str
    parameters: int | None
    batch: int | None
    sizes: dict[str, int]
    steps: int
    warmup: int
    seed: int
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ConfigResult:
    """Everything measured for one configuration; ``None`` where it could not be measured.

    Attributes:
        name: the configuration (with its ``:arg``).
        status: ``"ok"``; ``"FAIL"`` when loss, gradients or buffers differ from ``none``'s
            beyond ``torch.testing.assert_close`` tolerances; ``"oom"`` when it ran out of memory;
            ``"infeasible"`` when the planner found no plan within an ``auto:<budget>``;
            ``"crashed"`` when its worker raised or died.
        error: what went wrong, one line (``None`` when ok).
        forward_peak_bytes: remat's tracker: peak live bytes during the forward pass,
            parameters and inputs included.
        step_peak_bytes: the same over the whole training step (forward + backward).
        step_new_peak_bytes: the step's peak of new bytes (parameters, buffers and inputs
            excluded): what ``remat.profile`` calls the step's peak, and what a percentage
            budget (``remat plan --budget 40%``) is a share of.
        saved_bytes: bytes autograd kept for the backward pass at the end of the forward.
        cuda_max_allocated_bytes: ``torch.cuda.max_memory_allocated`` over the step (CUDA only).
        cuda_max_reserved_bytes: ``torch.cuda.max_memory_reserved`` over the step (CUDA only).
        step_times_s: one training step's wall time per timed round.
        median_step_s: the median of ``step_times_s``.
        time_spread: the largest repeat over the median, ``max(step_times_s) / median``; above
            :data:`NOISY_SPREAD` the machine was busy and the time columns are not a result.
        time_ratio: ``median_step_s`` over ``none``'s.
        flops: FLOPs of one training step (``FlopCounterMode``), recomputation included.
        extra_flops: ``flops`` minus ``none``'s: the price of recomputation.
        loss: the step's loss.
        loss_diff: ``|loss - none's loss|``.
        max_grad_diff: largest absolute difference of any gradient element from ``none``'s (a
            gradient missing on one side counts as zeros there).
        grads_match: loss and every gradient within ``assert_close`` tolerances of ``none``'s.
        max_buffer_diff: largest absolute difference of any buffer element from ``none``'s
            after the step (BatchNorm running statistics, ``num_batches_tracked``).
        buffers_match: every buffer within ``assert_close`` tolerances of ``none``'s.
        timeline: ``[op_index, live_bytes]`` over the training step, max-pooled to at most
            ``TIMELINE_POINTS`` points so peaks survive.
        backward_start: the op index at which the backward pass starts.
    """

    name: str
    status: str = "ok"
    error: str | None = None
    forward_peak_bytes: int | None = None
    step_peak_bytes: int | None = None
    step_new_peak_bytes: int | None = None
    saved_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None
    step_times_s: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    time_spread: float | None = None
    time_ratio: float | None = None
    flops: int | None = None
    extra_flops: int | None = None
    loss: float | None = None
    loss_diff: float | None = None
    max_grad_diff: float | None = None
    grads_match: bool | None = None
    max_buffer_diff: float | None = None
    buffers_match: bool | None = None
    timeline: list[list[int]] = field(default_factory=list)
    backward_start: int | None = None


@dataclass(kw_only=True)
class BenchResult:
    """A whole ``remat bench`` run: the environment and one row per configuration."""

    environment: Environment
    configs: list[ConfigResult]

    @property
    def noisy(self) -> list[str]:
        """Configurations with a repeat more than :data:`NOISY_SPREAD` times their median."""
        return [c.name for c in self.configs if (c.time_spread or 0) > NOISY_SPREAD]

    @property
    def failed(self) -> list[str]:
        """Configurations that differ from ``none`` (FAIL) or whose worker crashed."""
        return [c.name for c in self.configs if c.status in ("FAIL", "crashed")]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: ``{"schema", "environment", "configs"}``."""
        return {"schema": SCHEMA, **asdict(self)}

    def write_json(self, path: str) -> None:
        """Write :meth:`to_dict` to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")


@dataclass(kw_only=True)
class BenchOptions:
    """What to benchmark (the ``remat bench`` flags).

    Attributes:
        model: ``mlp``, ``gpt``, ``convnet`` or ``hf:<arch>``.
        configs: configuration names as :func:`parse_configs` returns them; ``None``: defaults.
        batch: batch size; ``None`` for the model's default.
        device: ``"cpu"`` or ``"cuda"``; ``None`` picks cuda when available.
        dtype: one of ``DTYPES``.
        steps: timed rounds; each round times one step of every configuration.
        warmup: untimed rounds before them.
        sizes: model size options (``n_layers``, ``d_model``, ``n_heads``, ``seq_len``,
            ``vocab_size``) for gpt and hf models.
        model_args: config fields of an ``hf:<arch>`` model, or the options of a user's
            ``file.py:factory`` (``--model-arg k=v``).
        seed: seeds weights, data and every step's RNG.
    """

    model: str = "mlp"
    configs: list[str] | None = None
    batch: int | None = None
    device: str | None = None
    dtype: str = "float32"
    steps: int = 5
    warmup: int = 1
    sizes: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    model_args: dict[str, Any] = field(default_factory=dict)


def environment_base() -> dict[str, str]:
    """Versions and platform, the parts of :class:`Environment` known without a worker."""

    return {
        "remat_version": getattr(remat, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def resolve_device(device: str | None) -> str:
    """``None`` -> cuda when available, else cpu; validate an explicit choice.

    Raises:
        ValueError: a device other than cpu/cuda.
        RuntimeError: cuda asked for and none available.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device.partition(":")[0] != "cuda":
        raise ValueError(f"unknown device {device!r}; valid devices: cpu, cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device}: no CUDA GPU available (torch.cuda.is_available() is False)"
        )
    return device


def check_options(options: BenchOptions) -> tuple[list[str], str]:
    """Validate ``options`` before any worker starts: (configuration names, device).

    Raises:
        ValueError: bad model, configuration (an ``auto:<budget>`` that does not parse),
            dtype, steps, batch or sizes.
        MissingExtraError: ``hf:<arch>`` without transformers.
        RuntimeError: ``device="cuda"`` without a GPU.
    """
    names = parse_configs(",".join(options.configs or []))
    check_model(options.model)
    check_model_options(
        options.model, batch=options.batch, sizes=options.sizes, model_args=options.model_args
    )
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if options.steps < 1 or options.warmup < 0:
        raise ValueError(
            f"steps must be >= 1 and warmup >= 0, got {options.steps}, {options.warmup}"
        )
    if options.batch is not None and options.batch < 1:
        raise ValueError(f"batch must be a positive integer, got {options.batch}")
    return names, resolve_device(options.device)


def run_bench(
    options: BenchOptions, *, progress: Callable[[int, int, str], None] | None = None
) -> BenchResult:
    """Run every configuration in its own worker process and collect the results.

    Args:
        options: what to run.
        progress: called as ``progress(done, total, what_next)`` as work advances.

    Returns:
        A :class:`BenchResult`; a configuration that crashed or ran out of memory has its
        status and error set and ``None`` figures, the others are complete.

    Raises:
        ValueError: bad model, configuration, dtype, steps or sizes.
        MissingExtraError: ``hf:<arch>`` without transformers.
        RuntimeError: ``device="cuda"`` without a GPU.
    """
    names, device = check_options(options)
    report = progress or (lambda done, total, what: None)

    with tempfile.TemporaryDirectory(prefix="remat-bench-") as tmp:
        results = {name: ConfigResult(name=name) for name in names}
        rounds = options.warmup + options.steps
        total, done = len(names) * (2 + rounds), 0
        ready: dict[str, dict[str, Any]] = {}
        workers: list[WorkerProcess] = []
        try:
            for i, name in enumerate(names):  # all started first: imports and builds overlap
                workers.append(WorkerProcess(name, i, options, device, tmp))
            for w in workers:
                report(done, total, f"starting {w.name}")
                if (msg := w.read()) is not None:
                    ready[w.name] = msg
                done += 1
            for w in workers:
                report(done, total, f"measuring {w.name}")
                if (msg := w.request("measure")) is not None:
                    for key, value in msg.items():
                        if hasattr(results[w.name], key):
                            setattr(results[w.name], key, value)
                done += 1
            # Interleaved: every round times one step of each configuration in turn.
            for r in range(rounds):
                what = "warm-up" if r < options.warmup else f"round {r - options.warmup + 1}"
                for w in workers:
                    report(done, total, f"timing {w.name} ({what})")
                    msg = w.request("step")
                    if msg is not None and r >= options.warmup:
                        results[w.name].step_times_s.append(msg["seconds"])
                    done += 1
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed: the workers go at once, not after
            # their current step, and the temporary folder with them.
            for w in workers:
                w.kill()
            raise
        finally:
            for w in workers:
                w.close()
        for w in workers:
            results[w.name].status, results[w.name].error = w.status, w.error
        _compare(list(results.values()), {w.name: w.grads_path for w in workers})
    report(total, total, "done")

    info = next(iter(ready.values()), {})
    env = Environment(
        **environment_base(),
        device=device,
        device_name=info.get("device_name", device),
        dtype=options.dtype,
        model=options.model,
        parameters=info.get("parameters"),
        batch=info.get("batch", options.batch),
        sizes=effective_sizes(options.model, options.sizes),
        model_args=dict(options.model_args),
        steps=options.steps,
        warmup=options.warmup,
        seed=options.seed,
    )
    return BenchResult(environment=env, configs=list(results.values()))


def compare_grads(
    reference: dict[str, Any], other: dict[str, Any]
) -> tuple[bool, float, float, list[str]]:
    """Compare a configuration's loss and gradients with the reference's.

    Args:
        reference: ``{"loss": Tensor, "grads": {name: Tensor | None}}`` of ``none``.
        other: the same for the configuration.

    Returns:
        ``(match, loss_diff, max_grad_diff, mismatched)``: whether loss and all gradients are
        within ``torch.testing.assert_close`` tolerances, the absolute loss difference, the
        largest absolute gradient difference, and the parameters whose gradients differ.
    """
    loss_ok = close(other["loss"], reference["loss"])
    loss_diff = (other["loss"].double() - reference["loss"].double()).abs().item()
    match, max_diff, mismatched = compare_tensors(reference["grads"], other["grads"])
    return loss_ok and match, loss_diff, max_diff, mismatched


def _compare(results: list[ConfigResult], grads_paths: dict[str, str]) -> None:
    """Fill the columns relative to ``none``: time ratio, extra FLOPs, gradient check."""
    for r in results:
        if r.step_times_s:
            r.median_step_s = statistics.median(r.step_times_s)
            r.time_spread = time_spread(r.step_times_s)
    ref = results[0]
    measured = ref.status == "ok" and os.path.exists(grads_paths[ref.name])
    reference = torch.load(grads_paths[ref.name], weights_only=True) if measured else None
    for r in results:
        if r.median_step_s is not None and ref.median_step_s:
            r.time_ratio = r.median_step_s / ref.median_step_s
        if r.flops is not None and ref.flops is not None:
            r.extra_flops = r.flops - ref.flops
        if reference is None or r.status != "ok":
            continue
        other = torch.load(grads_paths[r.name], weights_only=True)
        r.grads_match, r.loss_diff, r.max_grad_diff, bad = compare_grads(reference, other)
        r.buffers_match, r.max_buffer_diff, bad_buffers = compare_tensors(
            reference["buffers"], other["buffers"]
        )
        problems = []
        if not r.grads_match:
            what = f"{len(bad)} parameters, e.g. {bad[0]}" if bad else "the loss"
            problems.append(f"gradients differ ({what}; max |diff| {r.max_grad_diff:.3g})")
        if not r.buffers_match:
            # BatchNorm statistics updated again in recomputation, typically.
            problems.append(
                f"buffers differ ({len(bad_buffers)}, e.g. {bad_buffers[0]}; "
                f"max |diff| {r.max_buffer_diff:.3g})"
            )
        if problems:
            r.status, r.error = "FAIL", "; ".join(problems) + " vs none"
