"""Hugging Face ``transformers``: remat as the model's own gradient-checkpointing function.

``transformers`` models checkpoint their decoder layers through a hook: since 4.35,
``model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=f)`` stores ``f``
on every layer, and the layers call ``f(layer_forward, *args)`` (``GradientCheckpointingLayer``
in 4.5x/5.x passes ``partial(forward, layer, **kwargs)``; older models pass ``layer.__call__``).
:func:`enable` puts remat's engine in that slot, so ``Trainer``, PEFT and everything else that
drives the model's own checkpointing keep working, on remat's engine and policies::

    remat.integrations.hf.enable(model)                          # recompute every layer
    remat.integrations.hf.enable(model, remat.ops("save-matmuls"))
    remat.integrations.hf.enable(model, remat.every(2))          # every other layer

Later calls of ``model.gradient_checkpointing_enable(...)`` /
``activation_checkpointing_enable(...)`` (``Trainer`` with ``gradient_checkpointing=True``,
PEFT's ``prepare_model_for_kbit_training``) turn remat back on with their options instead of
installing ``torch.utils.checkpoint``; :func:`disable` undoes all of it.

Models written for transformers < 4.35 (``_set_gradient_checkpointing(module, value)``) call
``torch.utils.checkpoint`` directly, so there is no hook to plug into: :func:`enable` raises
and ``remat.apply(model, remat.by_type(LayerClass))`` is the way there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from remat.engine.region_modules import register_module_names
from remat.errors import PlanError, RematError
from remat.policy.offloading import offload as offload_treatment
from remat.policy.selectors import as_selector
from remat.policy.treatments import (
    Composed,
    Policy,
    Recompute,
    Treatment,
    _DefaultBlocks,
    recompute,
)
from remat.policy.wrapping import EXTERNAL_REGION, wrapped

__all__ = ["HFCheckpointFunction", "disable", "enable", "is_enabled"]

_STATE = "_remat_hf_state"
_SELECTED = "_remat_hf_selected"  # set on the layers a selector chose
_MISSING = object()
# The model's entry points that would otherwise install torch.utils.checkpoint again, and
# those that turn checkpointing off (then remat is off too: is_enabled says False).
_ENTRY_POINTS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")
_EXIT_POINTS = ("gradient_checkpointing_disable", "activation_checkpointing_disable")


@dataclass(slots=True)
class _State:
    """What :func:`enable` changed on the model, so :func:`disable` can undo it."""

    function: HFCheckpointFunction
    overridden: dict[str, Any]  # entry point name -> previous instance attribute or _MISSING


class HFCheckpointFunction:
    """The callable transformers stores as ``_gradient_checkpointing_func``.

    Called as ``f(layer_forward, *args, **torch_checkpoint_kwargs)``; runs the layer under
    ``treatment``. With ``selective``, only layers :func:`enable` marked are checkpointed (the
    mark lives on the layer, so deep copies and pickles of the model keep it).

    Args:
        treatment: what a checkpointed layer does (:class:`remat.Recompute`, :class:`remat.Ops`,
            an offload treatment).
        selective: checkpoint only marked layers; otherwise every layer transformers flags.
    """

    def __init__(self, treatment: Treatment, selective: bool = False) -> None:
        self.treatment = treatment
        self.selective = selective

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        treatment = _with_torch_options(self.treatment, kwargs, "the checkpoint call")
        forward, args, call_kwargs = _unpack(function, args)
        if self.selective:
            module = _layer_of(function)
            if module is not None and not module.__dict__.get(_SELECTED, False):
                return forward(*args, **call_kwargs)
        return treatment.run(forward, args, call_kwargs)  # routes itself under compile

    def __repr__(self) -> str:
        which = "selected layers" if self.selective else "all layers"
        return f"HFCheckpointFunction({self.treatment!r}, {which})"


def _layer_of(function: Any) -> nn.Module | None:
    """The layer a checkpointed callable belongs to (``partial(forward, layer)`` or a method)."""
    if isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        return _layer_of(function.func)
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _unpack(function: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Open ``partial(forward, layer, **kwargs)`` so the engine sees every argument.

    The kwargs transformers binds into the partial (attention mask, rotary embeddings) become
    inputs of the region: saved once as inputs, and given gradients by the function engine,
    rather than hidden in a closure. The layer stays bound through a partial, not a bound
    method: torch.compile rebuilds a bound method of a module as ``layer.forward``, which
    is transformers' checkpointing wrapper, and would recurse.
    """
    if not isinstance(function, functools.partial):
        return function, args, {}
    forward = functools.partial(function.func, *function.args) if function.args else function.func
    return forward, args, dict(function.keywords)


# torch.utils.checkpoint's keyword arguments, which transformers forwards from
# gradient_checkpointing_kwargs / TrainingArguments.
_TORCH_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "early_stop")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def _with_torch_options(treatment: Treatment, options: dict[str, Any], where: str) -> Treatment:
    """``treatment`` with the torch.utils.checkpoint options that mean something in remat.

    Raises:
        TypeError: an option remat cannot honour (``context_fn``: use ``remat.ops``) or an
            unknown one, named with ``where`` it came from.
    """
    if not options:
        return treatment
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if name not in _TORCH_KWARGS:
            hint = " (op-level policies are remat.ops(...))" if name == "context_fn" else ""
            raise TypeError(
                f"remat.integrations.hf: unsupported checkpoint option {name!r} in {where}{hint}; "
                f"accepted: {', '.join(_TORCH_KWARGS)}"
            )
        if name == "use_reentrant":
            # remat's engine is always non-reentrant, which is what DDP and PEFT need anyway.
            if value:
                _warn_once(
                    "use_reentrant",
                    "remat.integrations.hf: use_reentrant=True is ignored; remat's checkpoint "
                    "engine is non-reentrant (no 'mark a variable ready only once' under DDP, "
                    "no need for inputs that require grad)",
                )
            continue
        if name == "debug":
            if value:
                _warn_once("debug", "remat.integrations.hf: debug=True is ignored by remat")
            continue
        if name == "determinism_check" and value == "default":
            continue  # torch's default; remat's own default check stays
        fields = dataclasses.fields(treatment) if dataclasses.is_dataclass(treatment) else ()
        if name not in {f.name for f in fields}:
            raise TypeError(
                f"remat.integrations.hf: option {name!r} in {where} does not apply to the "
                f"{treatment.name!r} treatment"
            )
        changes[name] = value
    return dataclasses.replace(treatment, **changes) if changes else treatment


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``); any
    other module as it is. A PeftModel forwards every attribute it lacks to the model it
    wraps, so what is set on the wrapper never reaches transformers' own calls."""
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _pretrained(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` behind ``model`` (PEFT wraps it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"remat.integrations.hf: model must be an nn.Module, got {type(model).__name__}"
        )
    model = _unwrap(model)
    hook = getattr(model, "_set_gradient_checkpointing", None)
    if hook is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise RematError(
            f"remat.integrations.hf: {type(model).__name__} has no transformers "
            "gradient-checkpointing hook (supports_gradient_checkpointing and "
            "_set_gradient_checkpointing); use remat.apply(model, remat.by_type(LayerClass))"
        )
    params = inspect.signature(hook).parameters
    if "gradient_checkpointing_func" not in params:
        # transformers < 4.35 format (or a model overriding it in that format): the layers
        # call torch.utils.checkpoint themselves and nothing can be plugged in.
        raise RematError(
            f"remat.integrations.hf: {type(model).__name__} uses the pre-4.35 checkpointing "
            "format (_set_gradient_checkpointing(module, value)), which hard-codes "
            "torch.utils.checkpoint; use remat.apply(model, remat.by_type(LayerClass)) instead"
        )
    return model


def _resolve(policy: Any, options: dict[str, Any]) -> tuple[Treatment, Any]:
    """(treatment, selector or None) from :func:`enable`'s arguments."""
    if policy is None:
        return recompute(**options), None
    if options and not isinstance(policy, (Policy, Treatment)):
        return recompute(**options), as_selector(policy)
    if options:
        raise TypeError(
            f"remat.integrations.hf.enable: options {sorted(options)} only apply without a "
            "treatment in policy (they configure the default remat.recompute()); put them in "
            "the treatment instead, e.g. remat.recompute(engine='function')"
        )
    if isinstance(policy, Treatment):
        return policy, None
    if isinstance(policy, Policy):
        selector = policy.selector
        # A bare treatment turned into a Policy means "the repeated blocks": HF's layers.
        return policy.treatment, None if isinstance(selector, _DefaultBlocks) else selector
    return Recompute(), as_selector(policy)


def _layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: layers are called from the model's loop
        return None
    return GradientCheckpointingLayer


def enable(model: nn.Module, policy: Any = None, **options: Any) -> nn.Module:
    """Make remat the gradient-checkpointing function of a transformers model, in place.

    Args:
        model: a ``transformers.PreTrainedModel`` (or a ``peft.PeftModel`` around one).
        policy: ``None`` (recompute every layer), a treatment (``remat.ops("save-matmuls")``,
            ``remat.recompute(engine="function")``), a selector of layers (``remat.every(2)``,
            ``remat.by_type(LlamaDecoderLayer)``, a glob on qualified names) or both combined
            with ``&``. Only transformers' checkpointable layers can be selected.
        **options: options of the default ``remat.recompute()`` (``engine``,
            ``preserve_rng_state``, ``determinism_check``, ``early_stop``) when ``policy``
            holds no treatment.

    Returns:
        ``model``, in training-ready state (``model.is_gradient_checkpointing`` is true).

    Raises:
        RematError: the model has no checkpointing hook remat can use.
        TypeError: unknown options, or options given together with a treatment.
        PlanError: the selector selects nothing (as ``remat.apply`` says).
        ValueError: the selector selects a module that is not a checkpointable layer; or
            ``remat.apply`` was already used on the model.

    Example:
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> remat.integrations.hf.enable(model, remat.ops("save-matmuls"))
        >>> Trainer(model=model, args=args, train_dataset=data).train()
    """
    hf_model = _pretrained(model)
    if wrapped(hf_model):
        raise ValueError(
            "remat.integrations.hf.enable: remat.apply already wraps "
            f"{sorted(wrapped(hf_model))} of this model; use one or the other "
            "(remat.remove(model) first)"
        )
    treatment, selector = _resolve(policy, options)
    chosen: list[tuple[str, nn.Module]] = []
    if selector is not None:
        chosen = selector.select(hf_model)
        if not chosen:
            raise PlanError(
                f"remat.integrations.hf.enable: the policy selected no layer of "
                f"{type(hf_model).__name__}"
            )
        layer_class = _layer_class()
        for fqn, module in chosen:
            if layer_class is not None and not isinstance(module, layer_class):
                raise ValueError(
                    f"remat.integrations.hf.enable: selected module {fqn!r} "
                    f"({type(module).__name__}) is not a checkpointable transformers layer "
                    f"({layer_class.__name__}); use remat.apply for other modules"
                )
    layer_class = _layer_class() or nn.Module
    regions = (
        chosen
        if selector is not None
        else [
            (n, m)
            for n, m in hf_model.named_modules()
            if isinstance(m, layer_class) and hasattr(m, "gradient_checkpointing")
        ]
    )
    treatment.check(hf_model, regions)
    for module in hf_model.modules():
        module.__dict__.pop(_SELECTED, None)
    for _, module in chosen:
        module.__dict__[_SELECTED] = True
    function = HFCheckpointFunction(treatment, selective=selector is not None)
    register_module_names(hf_model)
    _install(hf_model, function, every_n_layers=1)
    state = hf_model.__dict__.get(_STATE)
    if state is None:
        state = _State(function, {})
        for name in (*_ENTRY_POINTS, *_EXIT_POINTS):
            if hasattr(type(hf_model), name):
                state.overridden[name] = hf_model.__dict__.get(name, _MISSING)
                # An instance attribute: transformers treats it as an override and routes
                # activation_checkpointing_enable through it as well.
                entry = _reenable if name in _ENTRY_POINTS else _disable_entry
                hf_model.__dict__[name] = functools.partial(entry, hf_model)
        hf_model.__dict__[_STATE] = state
    state.function = function
    _mark_regions(hf_model, function)
    return model


def _mark_regions(hf_model: nn.Module, function: HFCheckpointFunction | None) -> None:
    """Mark the layers ``function`` checkpoints (what ``remat.applied`` reports); ``None``
    clears the marks."""
    layer_class = _layer_class()
    for module in hf_model.modules():
        module.__dict__.pop(EXTERNAL_REGION, None)
        if function is None or not getattr(module, "gradient_checkpointing", False):
            continue
        is_layer = (
            isinstance(module, layer_class)
            if layer_class is not None
            else not hasattr(module, "_set_gradient_checkpointing")  # a model's own flag
        )
        if not is_layer or (function.selective and not module.__dict__.get(_SELECTED, False)):
            continue
        module.__dict__[EXTERNAL_REGION] = function.treatment.name


def _install(hf_model: nn.Module, function: HFCheckpointFunction, *, every_n_layers: int) -> None:
    hook = hf_model._set_gradient_checkpointing
    kwargs: dict[str, Any] = {"enable": True, "gradient_checkpointing_func": function}
    if every_n_layers != 1:
        if "every_n_layers" not in inspect.signature(hook).parameters:
            raise ValueError(
                f"remat.integrations.hf: every_n_layers={every_n_layers} needs a transformers "
                "version with per-layer selection; use remat.integrations.hf.enable(model, "
                f"remat.every({every_n_layers}))"
            )
        kwargs["every_n_layers"] = every_n_layers
    hook(**kwargs)


def _reenable(
    hf_model: nn.Module,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    activation_checkpointing_kwargs: dict[str, Any] | None = None,
    every_n_layers: int = 1,
    offload: bool = False,
) -> None:
    """``model.gradient_checkpointing_enable(...)`` after :func:`enable`: remat, not torch."""
    state: _State = hf_model.__dict__[_STATE]
    options = {**(gradient_checkpointing_kwargs or {}), **(activation_checkpointing_kwargs or {})}
    treatment = _with_torch_options(
        state.function.treatment, options, "gradient_checkpointing_kwargs"
    )
    if offload:
        # transformers' offload=True: checkpoint, and keep what the checkpoint saves (the
        # layers' inputs) in host memory, here remat's offload around remat's checkpoint.
        treatment = Composed(parts=(offload_treatment(min_bytes=0), treatment))
    state.function = HFCheckpointFunction(treatment, selective=state.function.selective)
    _install(hf_model, state.function, every_n_layers=every_n_layers)
    _mark_regions(hf_model, state.function)


def _disable_entry(hf_model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """``model.gradient_checkpointing_disable()`` after :func:`enable`: remat is off too."""
    disable(hf_model)


def is_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` made remat this model's checkpointing function (and it was
    not turned off since, by :func:`disable` or ``model.gradient_checkpointing_disable()``)."""
    return _STATE in _unwrap(model).__dict__


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: no checkpointing, and transformers' own entry points restored.

    Does nothing on a model :func:`enable` was not called on.

    Raises:
        TypeError: ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"remat.integrations.hf.disable: model must be an nn.Module, got {type(model).__name__}"
        )
    hf_model = _unwrap(model)
    state: _State | None = hf_model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for name, previous in state.overridden.items():
        if previous is _MISSING:
            del hf_model.__dict__[name]
        else:
            hf_model.__dict__[name] = previous
    for module in hf_model.modules():
        module.__dict__.pop(_SELECTED, None)
    _mark_regions(hf_model, None)
    # Resets every flag and the stored function to transformers' defaults.
    hf_model._set_gradient_checkpointing(enable=False)
    return model
