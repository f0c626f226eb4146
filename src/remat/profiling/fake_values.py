"""Answer a fake run's questions about data from the values the inputs really hold.

Under ``FakeTensorMode`` tensors hold no data, so a model that branches on values cannot take
the branch its real run takes. transformers asks ``is_tracing(tensor)`` (true for every
``FakeTensor``) and, when tracing, takes the branch that reads no data: it builds an explicit
attention mask, a packed-sequence mask from ``position_ids`` or a padding mask it cannot
prove to be all ones, where a real run without padding passes no mask and SDPA's
``is_causal``. That mask is then an input of every layer and changes what attention saves.

:func:`known_values` keeps, beside each fake tensor computed from known values alone (the
inputs made on the CPU, buffers with data, constants, factories such as ``arange``), its real
value, computed on the CPU by the same op: the ``position_ids`` a model makes, a boolean
padding mask. A question about data (``.item()``, ``bool()``, ``torch.equal``, ``nonzero``)
on such a tensor gets the real answer, and transformers is told that such tensors are not
traced, so it asks them. Tensors of unknown value (everything computed from the weights) stay
fake, and the questions about them fail or are avoided as before.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["known_values"]

# Outputs larger than this (or than the largest known input) get no value: the questions a
# model asks are about index-sized tensors, not about a (batch, 1, seq, seq) mask.
MIN_LIMIT_BYTES = 2**24

_UNKNOWN = object()


class _KnownValues(TorchDispatchMode):
    """Runs each op whose tensor arguments all have known values a second time, for real on
    the CPU, and keeps the result beside the fake output (see the module docstring)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        # fake tensor -> (its real value, the fake's version counter when it was computed):
        # an in-place op whose value is not known bumps the counter and so forgets the value
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def value_of(self, t: Any) -> Tensor | None:
        entry = self.values.get(t) if isinstance(t, FakeTensor) else None
        if entry is None or entry[1] != t._version:
            return None
        return entry[0]

    def remember(self, fake: Any, real: Any) -> None:
        if (
            isinstance(fake, FakeTensor)
            and isinstance(real, Tensor)
            and real.shape == fake.shape
            and real.dtype == fake.dtype
        ):
            self.values[fake] = (real, fake._version)

    def _real(self, x: Any) -> Any:
        if isinstance(x, FakeTensor):
            value = self.value_of(x)
            return _UNKNOWN if value is None else value
        if isinstance(x, Tensor):  # a constant with data (a real tensor a loss closes over)
            return _UNKNOWN if x.is_meta else _on_cpu(x)
        if isinstance(x, torch.device):
            return torch.device("cpu")
        return x

    def _real_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The arguments with real values in place of fake ones; ``None``: one is unknown."""
        leaves, spec = tree_flatten((args, kwargs))
        real = []
        for x in leaves:
            r = self._real(x)
            if r is _UNKNOWN:
                return None
            real.append(r)
        return tree_unflatten(real, spec)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # before the fake op: an in-place op bumps its argument's version
        known = self._real_call(args, kwargs)
        if known is None:
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            device = next((t.device for t in tree_leaves(args) if isinstance(t, FakeTensor)), None)
            if device is None:  # a question about real tensors only: the fake mode's answer
                raise
            return self._answer(func, known, device)
        fakes = [t for t in tree_leaves(out) if isinstance(t, FakeTensor)]
        if (
            not fakes
            or torch.Tag.nondeterministic_seeded in func.tags  # it would draw from the CPU RNG
            or any(t.untyped_storage().nbytes() > self.limit_bytes for t in fakes)
        ):
            return out
        try:
            real = _run_real(func, known)
        except Exception:  # the CPU cannot run it: the value stays unknown
            return out
        out_leaves, out_spec = tree_flatten(out)
        real_leaves, real_spec = tree_flatten(real)
        if out_spec == real_spec:
            for f, r in zip(out_leaves, real_leaves):
                self.remember(f, r)
        return out

    def _answer(self, func: Any, known: tuple[tuple, dict], device: torch.device) -> Any:
        """A value the fake op cannot give: a Python number, or a tensor whose shape depends
        on data, made fake on ``device`` (that of the op's fake arguments)."""
        real = _run_real(func, known)

        def to_fake(r: Any) -> Any:
            if not isinstance(r, Tensor):
                return r
            # called inside the handler, the factory runs on the fake mode below this one
            fake = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=device)
            self.remember(fake, r)
            return fake

        leaves, spec = tree_flatten(real)
        return tree_unflatten([to_fake(r) for r in leaves], spec)


def _on_cpu(t: Tensor) -> Tensor:
    """``t``'s values on the CPU; outside the fake mode, which would make a fake copy."""
    with unset_fake_temporarily(), torch.no_grad():
        return t.detach().cpu()


def _run_real(func: Any, known: tuple[tuple, dict]) -> Any:
    with unset_fake_temporarily(), torch.no_grad():
        return func(*known[0], **known[1])


@contextlib.contextmanager
def _transformers_reads(mode: _KnownValues) -> Iterator[None]:
    """transformers' ``is_tracing(tensor)`` says no for fake tensors of known value.

    ``is_tracing`` looks ``is_fake_tensor`` up in its module when called, so swapping that
    one function reaches every module that imported ``is_tracing``. A transformers without
    it (or not imported at all) is left alone: its masks stay those of a traced run.
    """
    utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(utils, "is_fake_tensor", None)
    if not callable(original):
        yield
        return

    def is_fake_tensor(x: Any) -> bool:
        return bool(original(x)) and mode.value_of(x) is None

    utils.is_fake_tensor = is_fake_tensor
    try:
        with _padding_warning_on_values(mode):
            yield
    finally:
        utils.is_fake_tensor = original


@contextlib.contextmanager
def _padding_warning_on_values(mode: _KnownValues) -> Iterator[None]:
    """transformers' padding warning (BERT-like encoders call it on every forward) reads
    ``input_ids[:, [-1, 0]]``: PyTorch turns the Python list into an index tensor on the
    indexed tensor's device, meta, where it holds no values. Given the input ids' real
    values, the warning reads those instead."""
    modeling = sys.modules.get("transformers.modeling_utils")
    cls = getattr(modeling, "PreTrainedModel", None)
    original = getattr(cls, "warn_if_padding_and_no_attention_mask", None)
    if not callable(original):
        yield
        return

    def warn(self: Any, input_ids: Any, attention_mask: Any) -> Any:
        real = mode.value_of(input_ids)
        return original(self, input_ids if real is None else real, attention_mask)

    cls.warn_if_padding_and_no_attention_mask = warn
    try:
        yield
    finally:
        cls.warn_if_padding_and_no_attention_mask = original


@contextlib.contextmanager
def known_values(pairs: Iterable[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Inside a ``FakeTensorMode`` (entered already), keep the real values computed from
    ``pairs``, and answer questions about data from them.

    Args:
        pairs: ``(fake tensor, the real tensor it copies)``; real tensors without data (meta)
            are left out.

    Example:
        >>> with fake, known_values([(fake_ids, ids)]):
        ...     model(fake_ids)  # transformers' masks take the branch of the real run
    """
    pairs = [
        (f, r)
        for f, r in pairs
        if isinstance(f, FakeTensor)
        and isinstance(r, Tensor)
        and not r.is_meta
        and not isinstance(r, FakeTensor)
    ]
    largest = max((r.untyped_storage().nbytes() for _, r in pairs), default=0)
    mode = _KnownValues(max(MIN_LIMIT_BYTES, largest))
    for f, r in pairs:
        mode.remember(f, _on_cpu(r))
    with mode, _transformers_reads(mode):
        yield
