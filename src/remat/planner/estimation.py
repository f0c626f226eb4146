"""Estimate a training step's memory without allocating it: ``MemoryTracker`` on fake tensors.

Under ``FakeTensorMode`` tensors carry shapes, dtypes, devices and storages of the right size
but no data, so the tracker's storage accounting gives the same bytes as a real run while
nothing is allocated. The model's parameters and buffers are swapped for fake copies for the
duration of the step (the model is restored untouched afterwards), so models far larger than
this machine can be measured: a Llama-70B-shaped model built on meta takes seconds.

Ops dispatch as on the parameters' device. A model built on ``meta`` runs meta kernels:
``scaled_dot_product_attention`` falls back to the math kernel and saves the attention
matrix, and dropout keeps its mask in the input's dtype. ``target_device="h100"`` runs
those ops as the target's kernels would (flash attention, one-byte dropout masks).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map

from remat.engine.checkpointing import checkpoint
from remat.measure.storage import device_of, iter_tensors, unique_storage_bytes
from remat.measure.tracker import MemoryTracker, TimelineEvent
from remat.measure.training_call import check_loss_fn, default_loss, training_call
from remat.policy.wrapping import applied, apply, remove
from remat.profiling.fake_model import (
    data_questions_named,
    fake_state,
    on_device,
    swapped,
    with_buffers,
)
from remat.profiling.fake_values import known_values
from remat.profiling.meta_kernel_gaps import meta_kernel_gaps
from remat.solver.units import fmt_bytes
from remat.targets.devices import Target, get_target
from remat.targets.kernels import target_kernels

__all__ = ["EstimateReport", "estimate"]

ModuleFilter = Iterable[str] | Callable[[nn.Module, str], bool]


@dataclass(frozen=True, kw_only=True)
class EstimateReport:
    """Memory of one training step (forward, scalar loss, backward), in bytes.

    Attributes:
        param_bytes: parameters (unique storages; tied weights once).
        buffer_bytes: buffers.
        input_bytes: the inputs given.
        grad_bytes: parameter gradients after backward.
        saved_bytes: activations autograd holds for backward at the end of forward.
        forward_peak_bytes: peak during forward (parameters, buffers, inputs included).
        peak_bytes: peak of the whole step, gradients included.
        saved_bytes_by_module: ``MemoryTracker.saved_bytes_by_module``.
        peak_by_module: ``MemoryTracker.peak_by_module``.
        checkpointed: qualified names of the modules run under ``remat.checkpoint``.
        timeline: the tracker's events (empty unless asked for).
    """

    param_bytes: int
    buffer_bytes: int
    input_bytes: int
    grad_bytes: int
    saved_bytes: int
    forward_peak_bytes: int
    peak_bytes: int
    saved_bytes_by_module: dict[str, int]
    peak_by_module: dict[str, int]
    checkpointed: tuple[str, ...] = ()
    timeline: list[TimelineEvent] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (without the timeline)."""
        d = asdict(self)
        d.pop("timeline")
        d["checkpointed"] = list(self.checkpointed)
        return d

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict()`` as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def step_peak_bytes(self) -> int:
        """The step's peak of new bytes (parameters, buffers and inputs excluded): what
        ``remat.profile`` and ``remat bench`` call the step's peak, and what a percentage
        budget is a share of."""
        return self.peak_bytes - self.param_bytes - self.buffer_bytes - self.input_bytes

    def __str__(self) -> str:
        rows = [
            ("parameters", self.param_bytes),
            ("gradients", self.grad_bytes),
            ("buffers", self.buffer_bytes),
            ("inputs", self.input_bytes),
            ("saved activations", self.saved_bytes),
            ("forward peak", self.forward_peak_bytes),
            ("step peak (new bytes)", self.step_peak_bytes),
            ("total peak", self.peak_bytes),
        ]
        lines = [f"{name:<22} {fmt_bytes(b):>10}  {b:>19,} B" for name, b in rows]
        lines.append(f"{'checkpointed':<22} {len(self.checkpointed)} modules")
        lines.append("forward and total peaks count the parameters, buffers and inputs")
        return "\n".join(lines)


def estimate(
    model: nn.Module,
    *inputs: Tensor | torch.Size | tuple[int, ...],
    checkpoint_modules: ModuleFilter | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    timeline: bool = False,
    policy: Any = None,
    target_device: str | Target | None = None,
    **kwargs: Any,
) -> EstimateReport:
    """Measure one training step of ``model`` on fake tensors, allocating nothing.

    Args:
        model: any module, on any device (``meta`` included); it is not modified.
        *inputs: positional inputs: tensors (their shape and dtype are used), or shapes, which
            become tensors of the model's floating dtype.
        checkpoint_modules: modules to run under ``remat.checkpoint``: qualified names, or a
            ``(module, fqn) -> bool`` filter. ``None``: no checkpointing.
        loss_fn: ``output -> scalar``; default: the output's (or its ``.loss``/``.logits``, or
            its first floating tensor's) ``.float().sum()``.
        timeline: keep the tracker's per-op timeline in the report.
        policy: a ``remat.apply`` policy (``remat.every(1)``, ``remat.ops("save-matmuls")``,
            ...) applied for the estimate only; an alternative to ``checkpoint_modules``.
        target_device: count what the target's kernels keep (``"h100"``: CUDA's one-byte
            dropout masks, flash or memory-efficient attention; ``"cpu"``: the CPU's flash
            attention), as :func:`remat.targets.kernels.target_kernels` describes.
            ``None``: the kernels of the model's device (math attention on meta).
        **kwargs: keyword inputs of ``model`` (tensors become fake copies too; a model
            input may be named ``target``).

    Returns:
        An :class:`EstimateReport`.

    Raises:
        TypeError: ``model`` is not a module, an input is neither a tensor nor a shape.
        ValueError: unknown module name in ``checkpoint_modules``, tensor inputs on different
            devices, or an output without a floating tensor to take the loss of.

    Example:
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(config)
        >>> ids = torch.zeros(1, 4096, dtype=torch.long)
        >>> print(estimate(model, ids, checkpoint_modules=lambda m, n:
        ...     type(m).__name__ == "LlamaDecoderLayer"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"estimate: model must be an nn.Module, got {type(model)!r}")
    device_of([*inputs, *kwargs.values()], what="inputs")
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = torch.float32 if first is None else first.dtype
    device = torch.device("cpu") if first is None else first.device
    if policy is not None and checkpoint_modules is not None:
        raise ValueError("estimate: pass either policy= or checkpoint_modules=, not both")
    check_loss_fn(loss_fn, "estimate")
    target = None if target_device is None else get_target(target_device)
    names = _select(model, checkpoint_modules)

    # Fake copies of every parameter and buffer (same device, no data): gradients land on
    # these, not on the model. FakeTensorMode rather than plain meta tensors because ops then
    # dispatch as on the real device (sdpa picks the same kernel) and models that branch on
    # data can tell they are being traced (transformers checks for fake tensors).
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    params, buffers = fake_state(fake, model)
    fake_inputs = tuple(_to_fake_input(fake, x, i, dtype, device) for i, x in enumerate(inputs))
    fake_kwargs = tree_map(
        lambda x: on_device(fake, fake.from_tensor(x), device) if isinstance(x, Tensor) else x,
        kwargs,
    )
    copies = [*zip(fake_inputs, inputs), *zip(tree_leaves(fake_kwargs), tree_leaves(kwargs))]
    existing = [*params.values(), *buffers.values(), *iter_tensors(fake_inputs, fake_kwargs)]

    tracker = MemoryTracker(module=model, count_existing=existing, timeline=timeline)
    tracker._state.extend(buffers.values())  # buffers are state, not activations
    with (
        data_questions_named(model, "remat.estimate"),
        training_call(model),
        swapped(model, params, buffers),
        _checkpointed(model, names),
        _policy_applied(model, policy) as policy_regions,
        fake,
        meta_kernel_gaps(),
        known_values(with_buffers(copies, model, buffers)),
        torch.enable_grad(),
        target_kernels(target),
        tracker,
    ):
        out = model(*fake_inputs, **fake_kwargs)
        forward_peak = tracker.peak_bytes
        loss = (loss_fn or default_loss)(out)
        del out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"estimate: loss_fn must return a scalar tensor, got {loss!r}")
        loss.backward()
        del loss

    return EstimateReport(
        param_bytes=unique_storage_bytes(params.values()),
        buffer_bytes=unique_storage_bytes(buffers.values()),
        input_bytes=unique_storage_bytes(iter_tensors(fake_inputs, fake_kwargs)),
        grad_bytes=unique_storage_bytes(p.grad for p in params.values() if p.grad is not None),
        saved_bytes=tracker.saved_bytes,
        forward_peak_bytes=forward_peak,
        peak_bytes=tracker.peak_bytes,
        saved_bytes_by_module=dict(tracker.saved_bytes_by_module),
        peak_by_module=dict(tracker.peak_by_module),
        checkpointed=tuple(names) + tuple(policy_regions),
        timeline=tracker.timeline,
    )


@contextlib.contextmanager
def _policy_applied(model: nn.Module, policy: Any) -> Iterator[list[str]]:
    """Apply a remat policy for the estimate, and take it off again afterwards."""
    if policy is None:
        yield []
        return

    if applied(model):
        raise ValueError(
            "estimate: the model already has a remat policy applied; pass policy=None to "
            "estimate it as it is, or remat.remove(model) first"
        )
    apply(model, policy)
    try:
        yield list(applied(model))
    finally:
        remove(model)


def _to_fake_input(
    fake: FakeTensorMode, x: Any, i: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    if isinstance(x, Tensor):
        return on_device(fake, fake.from_tensor(x), device)
    if isinstance(x, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in x):
        with fake:  # a fake tensor on the model's device, nothing allocated
            return torch.empty(tuple(x), dtype=dtype, device=device)
    raise TypeError(f"estimate: inputs[{i}] must be a tensor or a shape, got {type(x).__name__}")


def _select(model: nn.Module, which: ModuleFilter | None) -> list[str]:
    if which is None:
        return []
    if callable(which):
        return [n for n, m in model.named_modules() if which(m, n)]
    if isinstance(which, str):
        which = [which]
    if not isinstance(which, (list, tuple, set, frozenset)) or not all(
        isinstance(n, str) for n in which
    ):
        raise TypeError(
            "estimate: checkpoint_modules must be module names or a (module, fqn) -> bool "
            f"filter, got {type(which).__name__} {which!r}"
        )
    known = dict(model.named_modules())
    names = list(which)
    for n in names:
        if n not in known:
            raise ValueError(f"checkpoint_modules: {type(model).__name__} has no module {n!r}")
    return names


@contextlib.contextmanager
def _checkpointed(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run each named module's forward under ``remat.checkpoint``, restoring it afterwards.

    The wrapper is an instance attribute, so module hooks still fire around it and the saved
    inputs are attributed to the checkpointed module.
    """
    modules = dict(model.named_modules())
    patched = []
    try:
        for n in names:
            mod = modules[n]
            orig = mod.forward

            def fwd(*args: Any, _orig=orig, **kw: Any) -> Any:
                return checkpoint(_orig, *args, **kw)

            had = "forward" in mod.__dict__
            mod.forward = fwd
            patched.append((mod, had, orig))
        yield
    finally:
        for mod, had, orig in reversed(patched):
            if had:
                mod.forward = orig
            else:
                del mod.forward
