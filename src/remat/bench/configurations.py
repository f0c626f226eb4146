"""The configurations ``remat bench`` compares, and the workloads it runs them on.

A configuration is a :class:`BenchConfig` in :data:`CONFIGS`: a name and a function that wraps
the workload's model in place, inside the worker process. Adding one (including a
parameterised one such as ``auto:40%``, which receives ``"40%"``) is one ``register_config``.
``remat`` and ``all-blocks`` go through ``remat.apply`` (see :func:`policy_config`); the
``tutorial*`` ones wrap blocks the tutorial's way, by replacing ``forward`` on the instance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.bench.workloads import MODEL_NAMES, Workload

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# --------------------------------------------------------------------------------------------
# Configurations: how each one wraps the model. A new configuration is one `register_config`.


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One way of running the training step.

    Attributes:
        name: what ``--configs`` accepts (``name`` or ``name:arg`` when ``takes_arg``).
        description: one line for ``--help`` and the docs.
        apply: ``(workload, arg) -> None``; wraps ``workload.model`` in place, runs in the worker.
        takes_arg: whether the configuration is parameterised (``auto:40%``); ``arg`` is the
            text after the colon, ``None`` when absent.
        default: part of the default set. Off for configurations that show a bug on purpose.
        hidden: left out of help and listings (test-only configurations).
        check_arg: ``arg -> None``, raising ``ValueError`` for an argument the configuration
            cannot take; called by :func:`parse_configs`, before any worker starts.
    """

    name: str
    description: str
    apply: Callable[[Workload, str | None], None]
    takes_arg: bool = False
    default: bool = True
    hidden: bool = False
    check_arg: Callable[[str | None], None] | None = None


CONFIGS: dict[str, BenchConfig] = {}


def register_config(config: BenchConfig) -> BenchConfig:
    """Add ``config`` to :data:`CONFIGS` (replacing one of the same name) and return it."""
    if ":" in config.name or "," in config.name:
        raise ValueError(f"config name {config.name!r} must not contain ':' or ','")
    CONFIGS[config.name] = config
    return config


def default_config_names() -> list[str]:
    """Names of the configurations ``remat bench`` runs when ``--configs`` is not given."""
    return [c.name for c in CONFIGS.values() if c.default and not c.hidden]


def parse_configs(text: str | None) -> list[str]:
    """Split ``--configs`` text into validated names, ``none`` first.

    Args:
        text: comma-separated names such as ``"remat,all-blocks"`` or ``"auto:40%"``;
            ``None`` or ``""`` means the default set.

    Returns:
        The configuration names (with their ``:arg``), ``none`` first and without duplicates.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or an argument given to a
            configuration that takes none.
    """
    names = [n.strip() for n in (text or "").split(",") if n.strip()] or default_config_names()
    valid = ", ".join(c.name + (":<arg>" if c.takes_arg else "") for c in _listed())
    for name in names:
        base, sep, _ = name.partition(":")
        config = CONFIGS.get(base)
        if config is None:
            raise ValueError(f"unknown configuration {name!r}; valid configurations: {valid}")
        if sep and not config.takes_arg:
            raise ValueError(f"configuration {base!r} takes no argument, got {name!r}")
        if config.check_arg is not None:
            config.check_arg(name.partition(":")[2] if sep else None)
    # `none` is the reference for gradients, time and FLOPs, so it always runs, first.
    return list(dict.fromkeys(["none", *names]))


def _listed() -> list[BenchConfig]:
    return [c for c in CONFIGS.values() if not c.hidden]


def checkpointed_blocks(workload: Workload) -> tuple[str, ...]:
    """The tutorial's choice: every block but the last (blocks 1–2 of the 3-block MLP)."""
    return workload.blocks[:-1]


def wrap_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]):
    """Replace ``module.forward`` on the instance by ``make(original_forward)``.

    An instance attribute leaves parameters, buffers and ``state_dict`` keys untouched. The
    checkpoint function must be given the original bound ``forward``, not the module: calling
    the module would re-enter the wrapper.
    """
    module.forward = make(module.forward)


def _wrap_blocks(workload: Workload, names: tuple[str, ...], make) -> None:
    for name in names:
        wrap_forward(workload.model.get_submodule(name), make)


def _torch_checkpoint(reentrant: bool):
    def make(forward):
        def wrapped(*args, **kwargs):
            from torch.utils.checkpoint import checkpoint

            fn = functools.partial(forward, **kwargs) if kwargs else forward
            return checkpoint(fn, *args, use_reentrant=reentrant)

        return wrapped

    return make


def _remat_function(forward):
    def wrapped(*args, **kwargs):
        import remat

        fn = functools.partial(forward, **kwargs) if kwargs else forward
        return remat.CheckpointFunction.apply(fn, *args)

    return wrapped


def policy_config(
    name: str,
    description: str,
    policy: Callable[[Workload, str | None], Any],
    **options: Any,
) -> BenchConfig:
    """A configuration that runs ``remat.apply(model, policy(workload, arg))``.

    Policy-based configurations are one line each this way, e.g.
    ``register_config(policy_config("every2", "every 2nd block", lambda w, a: remat.every(2)))``
    or, parameterised, ``policy_config("auto", "planner at a budget", make_plan, takes_arg=True)``.

    Args:
        name: the configuration's name.
        description: one line for ``--help``.
        policy: ``(workload, arg) -> policy`` for :func:`remat.apply`.
        **options: further :class:`BenchConfig` fields (``takes_arg``, ``default``, ``hidden``).
    """

    def apply(workload: Workload, arg: str | None) -> None:
        import remat

        remat.apply(workload.model, policy(workload, arg))

    return BenchConfig(name=name, description=description, apply=apply, **options)


def _blocks(names: tuple[str, ...]):
    import remat

    # Exact qualified names (no glob characters in block names).
    return remat.by_name(*names)


def _ops(preset: str, engine: str = "replay"):
    import remat

    return remat.ops(preset, engine=engine)


def _sqrt():
    import remat

    return remat.sqrt()


def _offload(workload: Workload):
    import remat

    on_cpu = workload.inputs[0].device.type == "cpu"
    return remat.offload(store=remat.CpuStore() if on_cpu else None)


def check_budget(budget: str | None, what: str) -> None:
    """Raise ``ValueError`` for a budget that cannot be meant (before anything runs): one that
    does not parse, or a bare number of at most 100 (bytes by the rules, a percentage by
    intent)."""
    from remat.planner.budget import looks_like_percent, parse_budget

    if not budget:
        raise ValueError(f"{what} needs a budget, e.g. 40%, 300MB or 6GiB")
    if looks_like_percent(budget):
        raise ValueError(f"{what} {budget}: {budget} bytes fit no model; did you mean {budget}%?")
    parse_budget(budget, baseline_bytes=2**60)  # raises naming the bad budget


def _check_auto(arg: str | None) -> None:
    check_budget(arg, "configuration auto:<budget>")


def _auto(workload: Workload, arg: str | None) -> None:
    import remat

    remat.autoplan(
        workload.model,
        *workload.inputs,
        budget=arg,
        loss_fn=lambda out: workload.loss_fn(out, workload.targets),
    )


def _crash(workload: Workload, arg: str | None) -> None:
    # Test-only: a worker that dies for real (a signal, no Python exception to report).
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL if arg == "kill" else signal.SIGSEGV)


def _oom(workload: Workload, arg: str | None) -> None:
    # Test-only: a real allocator failure, as a configuration that needs too much memory gets.
    def make(forward):
        def wrapped(*args, **kwargs):
            torch.empty(1 << 62, dtype=torch.uint8, device=args[0].device)
            return forward(*args, **kwargs)

        return wrapped

    _wrap_blocks(workload, workload.blocks[:1], make)


for _config in (
    BenchConfig(
        name="none", description="no checkpointing (the reference)", apply=lambda w, a: None
    ),
    BenchConfig(
        name="tutorial",
        description="blocks 1..n-1 with torch.utils.checkpoint (use_reentrant=False)",
        apply=lambda w, a: _wrap_blocks(w, checkpointed_blocks(w), _torch_checkpoint(False)),
    ),
    BenchConfig(
        name="tutorial-function",
        description="blocks 1..n-1 with remat.CheckpointFunction.apply",
        apply=lambda w, a: _wrap_blocks(w, checkpointed_blocks(w), _remat_function),
    ),
    policy_config(
        "remat",
        "blocks 1..n-1 with remat.checkpoint (remat.apply)",
        lambda w, a: _blocks(checkpointed_blocks(w)),
    ),
    policy_config(
        "all-blocks",
        "every block with remat.checkpoint (remat.apply)",
        lambda w, a: _blocks(w.blocks),
    ),
    BenchConfig(
        name="tutorial-reentrant",
        description="reentrant torch.utils.checkpoint on blocks 1..n-1: the tutorial's bug "
        "(mlp: block inputs without requires_grad, blocks 1-2 get no gradients: FAIL)",
        apply=lambda w, a: _wrap_blocks(w, checkpointed_blocks(w), _torch_checkpoint(True)),
        default=False,
    ),
    policy_config(
        "every2",
        "every 2nd block recomputed (remat.apply)",
        lambda w, a: _blocks(w.blocks[::2]),
        default=False,
    ),
    policy_config(
        "save-matmuls",
        "every block, op-level: matmul/attention outputs kept, the rest recomputed",
        lambda w, a: _blocks(w.blocks) & _ops("save-matmuls"),
        default=False,
    ),
    policy_config(
        "save-matmuls-tape",
        "save-matmuls on the tape engine: single saved tensors recomputed, no replay",
        lambda w, a: _blocks(w.blocks) & _ops("save-matmuls", "tape"),
        default=False,
    ),
    policy_config(
        "sqrt",
        "Chen's sqrt(n) segments of the block list, each one region (remat.sqrt)",
        lambda w, a: _sqrt(),
        default=False,
    ),
    policy_config(
        "offload",
        "every block's saved tensors to host memory (on cpu: remat.CpuStore, a copy)",
        lambda w, a: _blocks(w.blocks) & _offload(w),
        default=False,
    ),
    BenchConfig(
        name="auto",
        description="remat's planner at a budget: auto:40% (of none's step peak) or auto:300MB",
        apply=_auto,
        takes_arg=True,
        default=False,
        check_arg=_check_auto,
    ),
    BenchConfig(
        name="_crash", description="test: worker dies", apply=_crash, hidden=True, takes_arg=True
    ),
    BenchConfig(name="_oom", description="test: allocation fails", apply=_oom, hidden=True),
):
    register_config(_config)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def check_model(name: str) -> None:
    """Validate a ``--model`` value before any worker starts.

    Raises:
        ValueError: unknown model or Hugging Face architecture (the message lists valid ones).
        MissingExtraError: ``hf:<arch>`` without transformers installed.
    """
    if name in MODEL_NAMES:
        return
    if name.startswith("hf:"):
        from remat.bench.hf_workloads import check_arch

        check_arch(name[3:])
        return
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}, "
        "hf:<arch> (e.g. hf:gpt2, hf:llama)"
    )


def check_sizes(model: str, sizes: dict[str, int]) -> None:
    """Raise ``ValueError`` for model sizes that cannot build, before any worker starts."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"size option {name}={value!r} must be a positive integer")
    if model == "gpt":
        from remat.bench.workloads import GPTConfig

        defaults = {"d_model": GPTConfig.d_model, "n_heads": GPTConfig.n_heads}
    elif model.startswith("hf:"):
        from remat.bench.hf_workloads import HF_DEFAULT_SIZES as defaults
    else:
        if sizes:
            raise ValueError(
                f"size options {sorted(sizes)} apply to gpt and hf:<arch>, not {model!r}"
            )
        return
    d_model, heads = (sizes.get(k, defaults[k]) for k in ("d_model", "n_heads"))
    if d_model % heads:
        raise ValueError(
            f"--d-model {d_model} is not divisible by --heads {heads}: every head gets "
            "d_model / heads features"
        )


def build_bench_workload(
    model: str, *, batch: int | None, device: str, dtype: str, seed: int, sizes: dict[str, int]
) -> Workload:
    """Build the workload ``remat bench`` runs: a demo model or ``hf:<arch>``."""
    if model.startswith("hf:"):
        from remat.bench.hf_workloads import build_hf_workload

        return build_hf_workload(
            model[3:], batch=batch, device=device, dtype=DTYPES[dtype], seed=seed, **sizes
        )
    from remat.bench.workloads import build_workload

    if sizes and model != "gpt":
        raise ValueError(f"size options {sorted(sizes)} apply to gpt and hf:<arch>, not {model!r}")
    return build_workload(
        model, batch=batch, device=device, dtype=DTYPES[dtype], seed=seed, **sizes
    )
