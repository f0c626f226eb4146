"""A model run on fake tensors: fake copies of its parameters, buffers and inputs in
place (restored afterwards), data-dependent branches taken as a real run takes them, and a
question about data a fake run cannot answer named by the module that asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._pytree import tree_map

from remat.errors import PlanError
from remat.profiling.fake_values import known_values
from remat.profiling.meta_kernel_gaps import meta_kernel_gaps

__all__ = [
    "data_questions_named",
    "fake_state",
    "faked_meta_model",
    "on_device",
    "swapped",
    "with_buffers",
]


@contextlib.contextmanager
def faked_meta_model(
    model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run a model on meta under ``FakeTensorMode``: its parameters, buffers and the inputs
    become fake copies (restored afterwards), so that models that branch on data can tell
    they are traced (transformers' masks call ``.all()``, which meta tensors cannot answer).
    Yields the fake inputs; a model not on meta runs as it is."""
    meta = next((t for t in (*model.parameters(), *model.buffers()) if t.is_meta), None)
    if meta is None:
        yield inputs, kwargs
        return
    # Meta tensors a loss function closes over (targets) are converted as they come.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    params, buffers = fake_state(fake, model)
    copies: list[tuple[Tensor, Tensor]] = []

    def to_fake(x: Any) -> Any:  # input_ids made on the CPU go to meta with the model
        if not isinstance(x, Tensor):
            return x
        copies.append((on_device(fake, fake.from_tensor(x), meta.device), x))
        return copies[-1][0]

    fake_inputs, fake_kwargs = tree_map(to_fake, inputs), tree_map(to_fake, kwargs)
    with (
        data_questions_named(model, "remat.profile"),
        swapped(model, params, buffers),
        fake,
        meta_kernel_gaps(),
        known_values(with_buffers(copies, model, buffers)),
    ):
        yield fake_inputs, fake_kwargs


@contextlib.contextmanager
def data_questions_named(model: nn.Module, who: str) -> Iterator[None]:
    """A fake run that reads a value it does not have (``.item()`` of something computed
    from the weights, a shape that depends on data) raises :class:`PlanError` naming the
    module that asked, instead of the fake mode's internal exception."""
    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as err:
        raise PlanError(
            f"{who}: on meta, {_asking_module(err, model)} reads the values of a tensor that "
            f"a meta run does not have ({err.func}: a number or a shape computed from data it "
            "cannot know, such as the weights); profile this model on a real device (a "
            "smaller config, the same layer types)"
        ) from err


def _asking_module(err: BaseException, model: nn.Module) -> str:
    """The innermost module of ``model`` running where ``err`` was raised."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = f"module {names[id(owner)] or type(owner).__name__!r} ({type(owner).__name__})"
        tb = tb.tb_next
    return found or f"the model ({type(model).__name__})"


def with_buffers(
    copies: list[tuple[Tensor, Tensor]], model: nn.Module, buffers: dict[int, Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """The fake inputs and buffers beside the tensors they copy, for :func:`known_values`: a
    model's data-dependent branches (transformers' attention masks) then go as they would in a
    real run with these inputs (buffers on meta hold no values and are left out there)."""
    return [*copies, *((buffers[id(b)], b) for b in model.buffers() if id(b) in buffers)]


def fake_state(
    fake: FakeTensorMode, model: nn.Module
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Fake copies of the model's parameters and buffers, keyed by ``id()`` of the originals
    (tied weights stay tied), for :func:`swapped`."""
    params = {
        id(p): nn.Parameter(fake.from_tensor(p).detach(), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return params, {id(b): fake.from_tensor(b) for b in model.buffers()}


def on_device(fake: FakeTensorMode, x: Tensor, device: torch.device) -> Tensor:
    """A fake input on the model's device: ``input_ids`` made on the CPU for a model built
    on meta (nothing is copied; fake tensors hold no data)."""
    if x.device == device:
        return x
    with fake:
        return x.to(device)


@contextlib.contextmanager
def swapped(model: nn.Module, params: dict[int, Tensor], buffers: dict[int, Tensor]):
    """Put the fake copies in place of the model's parameters and buffers for the whole step.

    ``functional_call`` would restore the originals when forward returns, before a checkpoint
    recomputes in backward. Keys are ``id()`` of the originals, so tied weights stay tied.
    """
    undo = []
    try:
        for mod in model.modules():
            for slot, new in ((mod._parameters, params), (mod._buffers, buffers)):
                for k, v in slot.items():
                    if v is not None and id(v) in new:
                        undo.append((slot, k, v))
                        slot[k] = new[id(v)]
        yield
    finally:
        for slot, k, v in reversed(undo):
            slot[k] = v
