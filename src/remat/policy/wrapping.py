"""Apply a policy to a model in place, and remove it again.

``apply`` replaces the ``forward`` of each selected module with one that runs the original
forward under the policy's treatment. Nothing else about the module changes: no wrapper
module is inserted, so ``state_dict()`` keys, ``named_parameters()``, hooks and ``repr`` are
exactly as without remat (PyTorch's ``checkpoint_wrapper`` adds a
``_checkpoint_wrapped_module`` prefix that then has to be hidden from checkpoints).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from remat.engine.region_modules import register_module_names
from remat.errors import PlanError
from remat.policy.selectors import as_selector
from remat.policy.treatments import Policy, Treatment, as_policy

__all__ = ["EXTERNAL_REGION", "applied", "apply", "remove", "wrapped"]

_STATE = "_remat_state"
# Set by integrations that checkpoint a module through its framework's own hook (hf.enable):
# the treatment's name, so that ``applied`` reports those regions too.
EXTERNAL_REGION = "_remat_external_region"


@dataclass(slots=True)
class _Wrapped:
    """What ``apply`` changed on one module, so ``remove`` can undo it exactly."""

    # Outermost first: a block can be a follower of a segment and checkpointed itself
    # inside that segment's recomputation (plans nest regions, Rotor-style).
    treatments: tuple[Treatment, ...]
    # The module's own instance-level forward before apply; None when it had none (a
    # sentinel object would not survive deepcopy/pickle).
    instance_forward: Any


def _run_wrapped(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _Wrapped = module.__dict__[_STATE]
    if state.instance_forward is None:
        # A partial, not type(module).forward.__get__(module): dynamo rebuilds a bound
        # method as module.forward after a graph break, which is this wrapper again.
        forward = functools.partial(type(module).forward, module)
    else:
        forward = state.instance_forward
    for treatment in reversed(state.treatments[1:]):
        forward = functools.partial(treatment.run_forward, forward)
    return state.treatments[0].run(forward, args, kwargs)


def apply(model: nn.Module, policy: Any, *, filter: Any = None) -> nn.Module:
    """Checkpoint the modules ``policy`` selects, in place.

    Args:
        model: the model; modified in place and returned.
        policy: a selector (``remat.by_type(Block)``, ``remat.every(2)``, a glob string, a
            module class or a ``(module, fqn) -> bool`` function: full recomputation), a
            treatment (``remat.ops(...)``, ``remat.offload(...)``: applied to the model's
            repeated blocks) or both combined with ``&``.
        filter: an extra selector the regions must also match.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module or ``policy``/``filter`` is not a policy.
        ValueError: conflicting or unknown options in the policy.
        PlanError: the policy selects no module of ``model`` (a glob that matches nothing);
            the model is left as it was.

    Applying again replaces what was applied before, as ``apply_plan`` does: the model ends
    with exactly this policy's regions (``remat.apply(m, every(2))`` then
    ``remat.apply(m, by_name("blocks.1"))`` checkpoints ``blocks.1`` alone). Of a selected
    module and its selected descendants, only the outermost becomes a region.

    Example:
        >>> model = remat.bench.workloads.GPT()
        >>> remat.apply(model, remat.every(2) & remat.ops("save-matmuls"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.apply: model must be an nn.Module, got {type(model).__name__}")
    pol: Policy = as_policy(policy)
    if filter is None:
        assignments = pol.assign(model)
    elif type(pol) is Policy:
        pol = Policy(selector=pol.selector & as_selector(filter), treatment=pol.treatment)
        assignments = pol.assign(model)
    else:
        raise ValueError(
            f"remat.apply: filter= cannot be combined with {type(pol).__name__}, which "
            "chooses its regions as a whole"
        )
    assignments = _outermost(assignments)
    if not assignments:
        names = [fqn for fqn, _ in model.named_modules() if fqn]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        raise PlanError(
            f"remat.apply: {_describe(policy)} selects no module of {type(model).__name__}, "
            f"whose modules are: {shown or 'none (it has no submodules)'}"
        )
    for treatment in {id(t): t for _, _, t in assignments}.values():
        treatment.check(model, [(fqn, m) for fqn, m, t in assignments if t is treatment])
    remove(model)  # applying again replaces, never merges
    roles: dict[int, tuple[nn.Module, list[Treatment]]] = {}
    for _, module, treatment in assignments:
        roles.setdefault(id(module), (module, []))[1].append(treatment)
    for module, treatments in roles.values():
        _wrap(module, tuple(treatments))
    register_module_names(model)
    return model


def _describe(policy: Any) -> str:
    """The policy as the user wrote it, for an error message."""
    if isinstance(policy, str):
        return f"the pattern {policy!r}"
    selector = getattr(policy, "selector", policy)
    return f"the policy {selector!r}"


def _outermost(
    regions: list[tuple[str, nn.Module, Treatment]],
) -> list[tuple[str, nn.Module, Treatment]]:
    """Drop regions inside another region (the root, when children are selected too).

    A module may appear several times with different roles (segment head or follower,
    then its own treatment): those are kept, in order.
    """
    names = {fqn for fqn, _, _ in regions}
    kept: list[tuple[str, nn.Module, Treatment]] = []
    for fqn, module, treatment in regions:
        if fqn == "" and len(names) > 1:
            continue
        if any(fqn.startswith(outer + ".") for outer in names if outer and outer != fqn):
            continue
        kept.append((fqn, module, treatment))
    return kept


def _wrap(module: nn.Module, treatments: tuple[Treatment, ...]) -> None:
    state = module.__dict__.get(_STATE)
    if state is not None:  # applied before: update, do not nest
        state.treatments = treatments
        return
    module.__dict__[_STATE] = _Wrapped(treatments, module.__dict__.get("forward"))
    module.forward = functools.partial(_run_wrapped, module)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` on every module of ``model``: original forwards, exactly.

    Raises:
        TypeError: ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remat.remove: model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.instance_forward is None:
            del module.forward
        else:
            module.forward = state.instance_forward
    return model


def applied(model: nn.Module) -> dict[str, str]:
    """Qualified name -> treatment name of every region remat checkpoints in ``model``:
    those ``remat.apply`` wrapped, and those an integration runs through the framework's
    own hook (``remat.integrations.hf.enable``)."""
    external = {
        fqn: module.__dict__[EXTERNAL_REGION]
        for fqn, module in model.named_modules()
        if EXTERNAL_REGION in module.__dict__
    }
    return {**external, **wrapped(model)}


def wrapped(model: nn.Module) -> dict[str, str]:
    """The regions :func:`apply` wrapped: qualified name -> treatment name."""
    return {
        fqn: "+".join(t.name for t in module.__dict__[_STATE].treatments)
        for fqn, module in model.named_modules()
        if _STATE in module.__dict__
    }
