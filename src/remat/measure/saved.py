"""The tutorial's hook check, in bytes: which modules keep activations for backward, and how
many (``remat.saved_activations``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from remat.measure.storage import device_of, iter_tensors
from remat.measure.tracker import MemoryTracker
from remat.measure.training_call import training_call

# ---- saved_activations: the tutorial's hook check, in bytes ------------------------------
__all__ = ["SavedActivation", "SavedActivationTable", "check_devices", "saved_activations"]


@dataclass(frozen=True, slots=True)
class SavedActivation:
    """One module's row in :func:`saved_activations`.

    Attributes:
        module: qualified name (``""`` is the root model).
        type: the module's class name.
        saved_bytes: activation bytes autograd keeps for backward because of ops in this module
            or its submodules (unique storages; parameters excluded).
        stores_activations: ``saved_bytes > 0``.
    """

    module: str
    type: str
    saved_bytes: int
    stores_activations: bool


class SavedActivationTable(list):
    """The rows of :func:`saved_activations`; ``total_bytes`` counts each storage once."""

    def __init__(self, rows: Iterable[SavedActivation], *, total_bytes: int) -> None:
        super().__init__(rows)
        self.total_bytes = total_bytes

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts."""
        return [asdict(r) for r in self]

    def to_json(self, **kwargs: Any) -> str:
        """The rows and the total as a JSON string (``kwargs`` go to ``json.dumps``)."""
        return json.dumps({"rows": self.to_dicts(), "total_bytes": self.total_bytes}, **kwargs)

    def __str__(self) -> str:
        names = [
            ("  " * r.module.count(".") + (r.module or "<root>")) if r.module else "<root>"
            for r in self
        ]
        w = max([len("module"), *map(len, names)])
        tw = max([len("type"), *(len(r.type) for r in self)])
        lines = [f"{'module':<{w}}  {'type':<{tw}}  {'saved bytes':>14}  {'MB':>9}  stores"]
        for name, r in zip(names, self):
            lines.append(
                f"{name:<{w}}  {r.type:<{tw}}  {r.saved_bytes:>14,}  "
                f"{r.saved_bytes / 1e6:>9.3f}  {'yes' if r.stores_activations else 'no'}"
            )
        lines.append(
            f"{'total (unique storages)':<{w + tw + 2}}  {self.total_bytes:>14,}  "
            f"{self.total_bytes / 1e6:>9.3f}"
        )
        return "\n".join(lines)


def saved_activations(model: nn.Module, *inputs: Any, **kwargs: Any) -> SavedActivationTable:
    """Bytes autograd keeps for backward, per module, after one forward of ``model``.

    Runs ``model(*inputs, **kwargs)`` once with gradients enabled under a
    :class:`MemoryTracker`, then drops the output and its graph.

    Args:
        model: the model; every module in ``model.named_modules()`` gets a row.
        *inputs: positional inputs of ``model``.
        **kwargs: keyword inputs of ``model``.

    Returns:
        A :class:`SavedActivationTable` (a list of :class:`SavedActivation`), printable.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the inputs, or inputs and parameters, are on different devices.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"saved_activations: model must be an nn.Module, got {type(model)!r}")
    check_devices(model, inputs, kwargs)
    tracker = MemoryTracker(
        module=model, count_existing=[model, *iter_tensors(inputs, kwargs)], timeline=False
    )
    with torch.enable_grad(), training_call(model), tracker:
        out = model(*inputs, **kwargs)
    del out  # drops the graph
    by_module = tracker.saved_bytes_by_module
    return SavedActivationTable(
        (
            SavedActivation(
                name, type(mod).__name__, by_module.get(name, 0), by_module.get(name, 0) > 0
            )
            for name, mod in model.named_modules()
        ),
        total_bytes=tracker.saved_bytes,
    )


def check_devices(model: nn.Module, inputs: tuple, kwargs: dict) -> None:
    """Raise ``ValueError`` naming the culprits when inputs and parameters share no device."""
    device = device_of([*inputs, *kwargs.values()], what="inputs")
    param = next(iter(model.parameters()), None)
    if device is not None and param is not None and param.device != device:
        raise ValueError(
            f"inputs are on {device} but the parameters of "
            f"{type(model).__name__} are on {param.device}"
        )
