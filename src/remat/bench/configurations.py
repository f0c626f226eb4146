"""The configurations ``remat bench`` compares (the models it runs them on:
:mod:`remat.bench.model_choice`).

A configuration is a :class:`BenchConfig` in :data:`CONFIGS`: a name and a function that wraps
the workload's model in place, inside the worker process. Adding one (including a
parameterised one such as ``auto:40%``, which receives ``"40%"``) is one ``register_config``.
``tutorial``, ``tutorial-function`` and ``remat`` run blocks 1..n-1 as ONE region, the
tutorial's way (by replacing ``forward`` on the instances); ``per-block``, ``all-blocks`` and
the other policies go through ``remat.apply`` (see :func:`policy_config`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import remat
from remat.bench.workloads import Workload
from remat.planner.plan_files import read_plan_file

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


def _chained(out: Any) -> Any:
    """What the next block takes from a block's output: the output, or its first item."""
    return out[0] if isinstance(out, tuple) else out


def _run_chain(forwards: list[Callable[..., Any]], x: Any, *args: Any, **kwargs: Any) -> Any:
    out = x
    for forward in forwards:
        out = forward(_chained(out), *args, **kwargs)
    return out


def _as_one_region(workload: Workload, names: tuple[str, ...], region: Callable[..., Any]):
    """Run the blocks ``names``, which the model calls one after the other (with the same
    other arguments: a mask, positions), as ONE checkpointed region, as the tutorial does
    (``checkpoint(self._checkpoint_layers, x)``): the first block's call runs them all
    under ``region(run, x, *args, **kwargs)``, and each later block, called on the output it
    has already computed, hands it back."""
    modules = [workload.model.get_submodule(n) for n in names]
    # A partial over the original bound forwards: the function engine finds the modules.
    run = functools.partial(_run_chain, [m.forward for m in modules])
    done: dict[str, Any] = {}

    def first(x: Any, *args: Any, **kwargs: Any) -> Any:
        done["out"] = region(run, x, *args, **kwargs)
        return done["out"]

    def hand_back(x: Any, *args: Any, **kwargs: Any) -> Any:
        if "out" not in done or x is not _chained(done["out"]):
            raise RuntimeError(
                f"blocks {', '.join(names)} as one region: the model must call them one after "
                f"the other, each on the one before's output, and "
                f"{type(workload.model).__name__}.forward does something in between; "
                "per-block or all-blocks checkpoint them separately"
            )
        return done["out"]

    modules[0].forward = first
    for module in modules[1:]:
        module.forward = hand_back


def _torch_region(reentrant: bool) -> Callable[..., Any]:
    def region(run: Callable[..., Any], x: Any, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        if reentrant:  # the reentrant form takes no keyword arguments
            run = functools.partial(run, **kwargs) if kwargs else run
            return checkpoint(run, x, *args, use_reentrant=True)
        return checkpoint(run, x, *args, use_reentrant=False, **kwargs)

    return region


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

        remat.apply(workload.model, policy(workload, arg))

    return BenchConfig(name=name, description=description, apply=apply, **options)


def _blocks(names: tuple[str, ...]):

    # Exact qualified names (no glob characters in block names).
    return remat.by_name(*names)


def _ops(preset: str, engine: str = "replay"):

    return remat.ops(preset, engine=engine)


def _sqrt():

    return remat.sqrt()


def offload_store_for(device: torch.device) -> remat.OffloadStore | None:
    """The store a run on ``device`` offloads to: on CPU a ``CpuStore`` (its copies free
    the originals, so the bytes show what a GPU would free), else the default (``None``:
    pinned host memory for CUDA tensors)."""
    return remat.CpuStore() if device.type == "cpu" else None


def _offload(workload: Workload):

    return remat.offload(store=offload_store_for(workload.device))


def check_budget(budget: str | None, what: str) -> None:
    """Raise ``ValueError`` for a budget that cannot be meant (before anything runs): one that
    does not parse, or a bare number of at most 100 (bytes by the rules, a percentage by
    intent). The same check as ``remat.autoplan``'s (``solver.budget.check_budget_value``)."""
    from remat.solver.budget import check_budget_value

    if not budget:
        raise ValueError(f"{what} needs a budget, e.g. 40%, 300MB or 6GiB")
    check_budget_value(budget, what)


def _check_auto(arg: str | None) -> None:
    check_budget(arg, "configuration auto:<budget>")


def _auto(workload: Workload, arg: str | None) -> None:

    remat.autoplan(
        workload.model, *workload.inputs, budget=arg, loss_fn=workload.loss_of, **workload.kwargs
    )


def load_plan_file(path: str | None) -> remat.Plan:
    """The plan saved at ``path``: ``Plan.to_json``'s file or ``remat plan --json``'s report
    (``remat.load_plan``).

    Raises:
        ValueError: no path, no such file, or not a plan (the field at fault named).
    """
    if not path:
        raise ValueError("configuration plan:<path.json> needs a file, e.g. plan:plan.json")
    try:
        return read_plan_file(path, f"configuration plan:{path}")
    except remat.PlanError as err:
        raise ValueError(str(err)) from None


def _apply_plan_file(workload: Workload, arg: str | None) -> None:

    store = offload_store_for(workload.device)  # a plan made for a GPU may offload
    remat.apply_plan(workload.model, load_plan_file(arg), offload_store=store)


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
        description="blocks 1..n-1 as one region with torch.utils.checkpoint "
        "(use_reentrant=False), the tutorial's checkpoint(self._checkpoint_layers, x)",
        apply=lambda w, a: _as_one_region(w, checkpointed_blocks(w), _torch_region(False)),
    ),
    BenchConfig(
        name="tutorial-function",
        description="blocks 1..n-1 as one region with remat.CheckpointFunction.apply",
        apply=lambda w, a: _as_one_region(
            w, checkpointed_blocks(w), remat.CheckpointFunction.apply
        ),
    ),
    BenchConfig(
        name="remat",
        description="blocks 1..n-1 as one region with remat.checkpoint",
        apply=lambda w, a: _as_one_region(w, checkpointed_blocks(w), remat.checkpoint),
    ),
    policy_config(
        "per-block",
        "blocks 1..n-1, each its own region, with remat.checkpoint (remat.apply): each "
        "block's input is kept",
        lambda w, a: _blocks(checkpointed_blocks(w)),
    ),
    policy_config(
        "all-blocks",
        "every block with remat.checkpoint (remat.apply)",
        lambda w, a: _blocks(w.blocks),
    ),
    BenchConfig(
        name="tutorial-reentrant",
        description="reentrant torch.utils.checkpoint on blocks 1..n-1 as one region: the "
        "tutorial's bug (mlp: the input does not require grad, blocks 1-2 get no gradients: "
        "FAIL)",
        apply=lambda w, a: _as_one_region(w, checkpointed_blocks(w), _torch_region(True)),
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
        name="plan",
        description="a saved plan applied with remat.apply_plan: plan:plan.json (remat plan "
        "--json's file, or Plan.to_json's)",
        apply=_apply_plan_file,
        takes_arg=True,
        default=False,
        check_arg=load_plan_file,
    ),
    BenchConfig(
        name="_crash", description="test: worker dies", apply=_crash, hidden=True, takes_arg=True
    ),
    BenchConfig(name="_oom", description="test: allocation fails", apply=_oom, hidden=True),
):
    register_config(_config)
