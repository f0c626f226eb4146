"""The user's own model on the command line: ``--model path/to/file.py:factory`` or
``--model package.module:factory``, with ``--model-arg k=v`` options.

``factory(**options)`` returns ``(model, inputs)`` or ``(model, inputs, loss_fn)``:

- ``inputs``: one tensor, a tuple or list of positional inputs, or a dict of keyword inputs
  (a transformers batch: ``{"input_ids": ..., "labels": ...}``);
- ``loss_fn``: ``output -> scalar``; without it, the model's own loss (``output.loss``), else
  the sum of its first floating output (``remat.profile``'s default).

See ``examples/08_my_model.py``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from remat.bench.workloads import Workload
from remat.measure.training_call import default_loss
from remat.policy.selectors import block_lists
from remat.profiling.regions import default_regions

__all__ = ["build_user_workload", "is_user_model", "load_factory", "parse_model_args"]


def is_user_model(spec: str) -> bool:
    """``file.py:factory`` or ``package.module:factory`` (not ``hf:<arch>``)."""
    return ":" in spec and not spec.startswith("hf:")


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["layers=4", "name=tiny", "bias=False"]`` -> ``{"layers": 4, "name": "tiny", "bias":
    False}``: Python literals where they parse, strings otherwise.

    Raises:
        ValueError: an item without ``=``, or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg {item!r}: expected key=value, e.g. layers=4")
        try:
            out[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    return out


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names.

    Raises:
        ValueError: the file or module does not exist, or has no such callable.
    """
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(
            f"--model {spec}: expected path/to/file.py:factory or package.module:factory"
        )
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"--model {spec}: no file {where!r}")
        module_name = f"_remat_user_model_{abs(hash(os.path.abspath(where)))}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, where)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as python -m does: modules under the cwd
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"--model {spec}: cannot import {where!r} ({err})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {where} has no callable {name!r}")
    return factory


def build_user_workload(
    spec: str,
    *,
    options: dict[str, Any],
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Workload:
    """Call the user's factory (seeded) and wrap what it returns as a :class:`Workload`.

    Raises:
        ValueError: the factory cannot be found, or returns something else than
            ``(model, inputs[, loss_fn])``.
    """
    factory = load_factory(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = factory(**options)
    model, inputs, loss_fn = _unpack(spec, result)
    model = model.to(device=device, dtype=dtype)

    def moved(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    args, kwargs = tree_map(moved, inputs)
    return Workload(
        name=spec,
        model=model,
        inputs=args,
        kwargs=kwargs,
        targets=None,
        loss_fn=lambda out, _: (loss_fn or default_loss)(out),
        blocks=_blocks(model),
    )


def _unpack(spec: str, result: Any) -> tuple[nn.Module, Any, Callable[[Any], Tensor] | None]:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise ValueError(
            f"--model {spec}: the factory must return (model, inputs) or (model, inputs, "
            f"loss_fn), got {type(result).__name__}"
        )
    model, inputs, *rest = result
    loss_fn = rest[0] if rest else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory's model is {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"--model {spec}: the factory's loss_fn is not callable")
    if isinstance(inputs, Tensor):
        inputs = ((inputs,), {})
    elif isinstance(inputs, dict):
        inputs = ((), dict(inputs))
    elif isinstance(inputs, (tuple, list)):
        inputs = (tuple(inputs), {})
    else:
        raise ValueError(
            f"--model {spec}: inputs must be a tensor, a tuple of positional inputs or a dict "
            f"of keyword inputs, got {type(inputs).__name__}"
        )
    return model, inputs, loss_fn


def _blocks(model: nn.Module) -> tuple[str, ...]:
    """The candidate regions: the children of the repeated-block lists, else the top-level
    regions ``remat.profile`` would use."""
    lists = block_lists(model)
    if lists:
        return tuple(
            f"{fqn}.{name}" if fqn else name
            for fqn, blocks in lists
            for name, _ in blocks.named_children()
        )
    return tuple(name for name, _ in default_regions(model))
