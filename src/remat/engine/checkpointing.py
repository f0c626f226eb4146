"""remat's checkpoint engine: ``checkpoint``, ``checkpoint_sequential``, ``CheckpointFunction``.

``checkpoint(fn, *args, **kwargs)`` returns what ``fn(*args, **kwargs)`` returns, keeping only
what the backward pass needs to recompute the rest. Two engines:

- ``"hooks"`` (default, :mod:`remat.engine.hooks`): ``saved_tensors_hooks``, like PyTorch's
  non-reentrant checkpoint. Everything autograd can do works through it.
- ``"function"`` (:mod:`remat.engine.function`): a ``torch.autograd.Function``, the tutorial's
  approach with its gradient bugs fixed.

Both replay RNG, autocast, the default device and module buffers (:mod:`remat.engine.replay`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from remat.engine.determinism import DETERMINISM_CHECKS, DeterminismCheck
from remat.engine.function import CheckpointFunction, checkpoint_function
from remat.engine.hooks import Frame
from remat.engine.region_modules import describe_fn, reachable_modules
from remat.engine.replay import ForwardState
from remat.errors import CheckpointError, check_bool, check_choice

__all__ = [
    "ENGINES",
    "CheckpointFunction",
    "Engine",
    "check_engine_options",
    "checkpoint",
    "checkpoint_sequential",
]

Engine = Literal["hooks", "function"]
ENGINES: tuple[str, ...] = get_args(Engine)
OPTIONS = ("engine", "preserve_rng_state", "determinism_check", "early_stop")
# torch.utils.checkpoint's options: a user porting code passes these by habit, and they
# would otherwise land in fn's kwargs and fail deep inside the model.
_TORCH_ONLY_OPTIONS = ("use_reentrant", "context_fn", "debug")


def checkpoint(
    fn: Callable[..., Any],
    *args: Any,
    engine: Engine = "hooks",
    preserve_rng_state: bool = True,
    determinism_check: DeterminismCheck = "metadata",
    early_stop: bool = True,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)``, keeping only its inputs for the backward pass.

    Activations inside ``fn`` are dropped after the forward and recomputed in backward from
    the inputs, exactly: same RNG draws (dropout masks), same autocast, same default device,
    and module buffers (BatchNorm statistics) updated once, as without checkpointing.

    Args:
        fn: a module or any callable. Tensors anywhere in ``args``/``kwargs`` (also inside
            lists, tuples and dicts) receive gradients.
        *args: positional arguments of ``fn``.
        engine: ``"hooks"`` (saved-tensor hooks; supports ``torch.autograd.grad``,
            ``backward(inputs=...)``, double backward and nesting) or ``"function"``
            (a ``torch.autograd.Function``, see :class:`CheckpointFunction`).
        preserve_rng_state: replay the forward's CPU and CUDA RNG state in recomputation.
            Turning it off saves a little time when the region draws no random numbers.
        determinism_check: ``"metadata"`` compares shape, dtype and device of every
            recomputed tensor with the forward's, ``"values"`` also their values (costs a
            few reductions per saved tensor), ``"none"`` skips the check.
        early_stop: stop recomputing as soon as every tensor the backward needs is back.
        **kwargs: keyword arguments of ``fn``.

    Returns:
        What ``fn`` returns (any pytree; non-tensor leaves pass through).

    Raises:
        TypeError: ``fn`` is not callable, an option has the wrong type, or a keyword
            argument is neither a remat option nor accepted by ``fn``.
        ValueError: unknown ``engine`` or ``determinism_check``.
        CheckpointError: recomputation did not reproduce the forward pass, or the engine
            cannot compute a gradient correctly (it never returns a wrong one).

    Example:
        >>> block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> checkpoint(block, x).sum().backward()
    """
    _validate(fn, engine, preserve_rng_state, determinism_check, early_stop, args, kwargs)
    return run_checkpoint(
        fn,
        args,
        kwargs,
        engine=engine,
        preserve_rng_state=preserve_rng_state,
        determinism_check=determinism_check,
        early_stop=early_stop,
    )


def run_checkpoint(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    engine: str = "hooks",
    preserve_rng_state: bool = True,
    determinism_check: str = "metadata",
    early_stop: bool = True,
    context_fn: Callable[[], tuple[Any, Any]] | None = None,
    frame: Frame | None = None,
) -> Any:
    """:func:`checkpoint` without argument checks, for callers that validated them once
    (``remat.apply``'s wrappers run this on every forward).

    ``context_fn`` (hooks engine only) returns the context managers to enter around the
    forward and the recomputation: op-level policies pass their dispatch modes here.
    ``frame`` (hooks engine only): run the call as the next call of that region (a
    segment's blocks); by default it is a region of its own.
    """
    if not torch.is_grad_enabled():  # no_grad / inference_mode: nothing to save
        return fn(*args, **kwargs)
    if engine == "function":
        return checkpoint_function(
            fn,
            args,
            kwargs,
            preserve_rng_state=preserve_rng_state,
            determinism_check=determinism_check,
        )
    state = ForwardState.capture(
        _tensor_leaves((args, kwargs)),
        reachable_modules(fn, [*args, *kwargs.values()]),
        preserve_rng_state=preserve_rng_state,
    )
    region = describe_fn(fn)
    if frame is None:
        frame = Frame(region, early_stop, determinism_check)
    out = frame.forward_call(fn, args, kwargs, state=state, region=region, context_fn=context_fn)
    if state.cuda_initialized_during_forward():
        raise CheckpointError(
            f"remat.checkpoint: CUDA was initialised inside {region}, so its CUDA RNG state "
            "could not be saved for recomputation. Initialise CUDA before (torch.cuda.init()) "
            "or pass preserve_rng_state=False if the region draws no random numbers."
        )
    return out


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _validate(
    fn: Any,
    engine: Any,
    preserve_rng_state: Any,
    determinism_check: Any,
    early_stop: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    if not callable(fn):
        raise TypeError(
            f"remat.checkpoint: fn must be callable (a module or a function), "
            f"got {type(fn).__name__}"
        )
    check_engine_options(
        "remat.checkpoint",
        engine,
        determinism_check,
        preserve_rng_state=preserve_rng_state,
        early_stop=early_stop,
    )
    if kwargs:
        _check_kwargs_accepted(fn, args, kwargs)


def check_engine_options(
    owner: str, engine: object, determinism_check: object, **flags: object
) -> None:
    """The engine options, checked once for ``checkpoint`` and every treatment that runs
    it: ``engine`` and ``determinism_check`` among their choices, ``flags`` bools."""
    check_choice(owner, "engine", engine, ENGINES)
    check_choice(owner, "determinism_check", determinism_check, DETERMINISM_CHECKS)
    for name, value in flags.items():
        check_bool(owner, name, value)


def _check_kwargs_accepted(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Name a keyword that is neither a remat option nor an argument of ``fn``."""
    # A module's __call__ takes **kwargs; what it accepts is its forward's signature.
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: let fn decide
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    for name in kwargs:
        if name not in accepted:
            hint = (
                " (a torch.utils.checkpoint option; remat has no reentrant mode and no "
                "context_fn: use engine= and remat's policies)"
                if name in _TORCH_ONLY_OPTIONS
                else ""
            )
            raise TypeError(
                f"remat.checkpoint: unknown keyword argument {name!r}{hint}. Keyword arguments "
                f"go to {describe_fn(fn)}, which does not accept it; remat's own options are "
                + ", ".join(OPTIONS)
            )


def checkpoint_sequential(
    modules: nn.Sequential | Sequence[Callable[..., Any]],
    segments: int,
    *inputs: Any,
    **options: Any,
) -> Any:
    """Split a chain of modules into ``segments`` parts and checkpoint them.

    Each stage's output feeds the next stage: a tuple is unpacked into several positional
    arguments, anything else is passed as one. As in PyTorch, the last segment runs without
    checkpointing, because backward needs its activations straight away.

    Args:
        modules: an ``nn.Sequential``, ``nn.ModuleList`` or list of callables, run in order.
        segments: number of segments, between 1 and ``len(modules)``.
        *inputs: positional inputs of the first module.
        **options: remat checkpoint options (``engine``, ``preserve_rng_state``,
            ``determinism_check``, ``early_stop``).

    Returns:
        The last module's output.

    Raises:
        TypeError: ``modules`` is not a sequence of callables, or an unknown option.
        ValueError: ``segments`` out of range.
    """
    if isinstance(modules, (nn.Sequential, nn.ModuleList, list, tuple)):
        stages = list(modules)
    else:
        raise TypeError(
            "checkpoint_sequential: modules must be an nn.Sequential, nn.ModuleList or list "
            f"of callables, got {type(modules).__name__}"
        )
    for i, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(f"checkpoint_sequential: modules[{i}] is not callable: {stage!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"checkpoint_sequential: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options are {', '.join(OPTIONS)}"
        )
    if isinstance(segments, bool) or not isinstance(segments, int):
        raise TypeError(f"checkpoint_sequential: segments must be an int, got {segments!r}")
    if not 1 <= segments <= max(len(stages), 1) or not stages:
        raise ValueError(
            f"checkpoint_sequential: segments={segments} must be between 1 and the number "
            f"of modules ({len(stages)})"
        )
    bounds = _segment_bounds(len(stages), segments)
    values: tuple[Any, ...] = inputs
    for index, (start, end) in enumerate(bounds):
        # A partial over the stage list, so checkpoint sees the modules (buffers, params).
        run = functools.partial(_run_stages, stages[start:end])
        last = index == len(bounds) - 1
        out = run(*values) if last else checkpoint(run, *values, **options)
        values = out if isinstance(out, tuple) else (out,)
    return out


def _segment_bounds(n: int, segments: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size (sizes differ by at most one)."""
    size = n / segments
    edges = [math.floor(i * size + 0.5) for i in range(segments)] + [n]
    return [(edges[i], edges[i + 1]) for i in range(segments)]


def _run_stages(stages: list[Callable[..., Any]], *values: Any) -> Any:
    out: Any = values
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return out
