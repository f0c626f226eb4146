"""How remat runs a model's training step when it measures or plans: as a training loop does.

A training step of a transformers model runs with its KV cache off: nothing reads the cache
in training, transformers turns it off under gradient checkpointing, and with it on a
measurement would count the cache and every replay of a single layer would append to it
(and, on fake tensors, mix the cache's real empty tensors with fake ones). The loss is the
model's own when it returns one (``labels`` given).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from remat.errors import PlanError

__all__ = ["cache_off", "check_loss_fn", "default_loss", "require_train_mode", "training_call"]


@contextlib.contextmanager
def training_call(model: nn.Module) -> Iterator[None]:
    """``model`` with the KV cache off in every config it holds (restored on exit)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is not None and id(config) not in configs:
            configs[id(config)] = (config, config.use_cache)
    for config, _ in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config, use_cache in configs.values():
            config.use_cache = use_cache


def cache_off(model: nn.Module, who: str) -> None:
    """Turn the KV cache off in the model's configs for good, with a warning, as
    transformers does under gradient checkpointing: a plan's peak is measured without the
    cache, which holds every layer's keys and values until the step ends."""
    changed = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False
            changed = True
    if changed:
        warnings.warn(
            f"{who}: set use_cache=False in {type(model).__name__}'s config, as transformers "
            "does under gradient checkpointing: the plan's peak was measured without the KV "
            "cache (pass use_cache=True to generate() or set it back for inference).",
            UserWarning,
            stacklevel=3,
        )


def default_loss(out: Any) -> Tensor:
    """The model's own loss (``out.loss``: a transformers output given ``labels``), else the
    sum of its logits or of its first floating tensor that requires grad.

    Raises:
        ValueError: the output holds no such tensor (pass a ``loss_fn``).
    """
    for attr in ("loss", "logits"):
        value = getattr(out, attr, None)
        if isinstance(value, Tensor):
            return value if attr == "loss" else value.float().sum()
    for t in tree_leaves(out):
        if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
            return t.float().sum()
    raise ValueError("the model's output holds no floating tensor that requires grad; pass loss_fn")


def check_loss_fn(loss_fn: Any, who: str) -> None:
    """Raise ``TypeError`` unless ``loss_fn`` is ``None`` or callable."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"{who}: loss_fn must be a callable (model output -> scalar loss) or None, got "
            f"{type(loss_fn).__name__} {loss_fn!r}"
        )


def require_train_mode(model: nn.Module, who: str) -> None:
    """Plans are for training: refuse a model in eval mode, whose dropout keeps no masks and
    whose batch norm keeps other tensors, so a plan measured there overruns in training.
    Submodules a training loop freezes in eval (batch norm) are its business.

    Raises:
        PlanError: the model is in eval mode.
    """
    if not model.training:
        raise PlanError(
            f"{who}: {type(model).__name__} is in eval mode; a plan measured without dropout "
            "masks and with batch norm's running statistics does not hold in training, "
            "where it keeps more. Call model.train() first, as the training loop does."
        )
