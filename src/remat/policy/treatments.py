"""Policies: which modules to checkpoint (selectors) and what to do inside them (treatments).

A policy is a selector combined with a treatment::

    remat.apply(model, remat.by_type(Block))                       # recompute whole blocks
    remat.apply(model, remat.every(2) & remat.ops("save-matmuls"))  # op-level, every 2nd block
    remat.apply(model, remat.offload(min_bytes=1 << 20))           # offload, default blocks

Selectors answer "is this module a region?" and combine with ``&`` and ``|``; a bare
``(module, fqn) -> bool`` function is a selector too. Treatments say how a selected module's
forward runs: :class:`Recompute` (plain checkpoint), :class:`Ops` (keep the outputs of some
ops, recompute the rest) or ``remat.offload`` (saved tensors to CPU, no recompute).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat.engine.checkpointing import Engine, check_engine_options, run_checkpoint
from remat.engine.determinism import DeterminismCheck
from remat.policy.selectors import Selector, as_selector, every

__all__ = [
    "Composed",
    "Policy",
    "Recompute",
    "Treatment",
    "as_policy",
    "is_compiling",
    "recompute",
    "traceable_checkpoint",
]


class Treatment:
    """How a selected module's forward runs. Subclasses implement :meth:`run`."""

    name: str = "treatment"

    def run(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        raise NotImplementedError

    def run_forward(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """:meth:`run` with the arguments spread, to stand in for a forward."""
        return self.run(forward, args, kwargs)

    def check(self, model: nn.Module, regions: list[tuple[str, nn.Module]]) -> None:
        """Called once by ``apply``: raise on options that conflict with this model."""

    def __rand__(self, other: Any) -> Policy:
        return Policy(selector=as_selector(other), treatment=self)


def is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def traceable_checkpoint(forward, args, kwargs, **options: Any) -> Any:
    """The region under ``torch.compile``: ``torch.utils.checkpoint``, which dynamo traces.

    remat's own engine reads the RNG state and enters ``saved_tensors_hooks``, so dynamo would
    break the graph and recompute the compiled region eagerly, saving other tensors.
    Non-reentrant ``torch.utils.checkpoint`` becomes a higher-order op that the compiler
    recomputes inside its own backward graph (with the same op-level save list, through
    ``context_fn``). Buffers are functionalized there: a BatchNorm's statistics are updated
    once, in the compiled forward (tests/integrations/test_compile_plans.py).
    """
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)


@dataclass(frozen=True, kw_only=True)
class Recompute(Treatment):
    """Drop every activation of the region and recompute it in backward (full checkpoint).

    Attributes:
        engine: ``"hooks"`` or ``"function"`` (see :func:`remat.checkpoint`).
        preserve_rng_state: replay RNG in recomputation (exact dropout); off saves a little.
        determinism_check: ``"metadata"``, ``"values"`` or ``"none"``.
        early_stop: stop recomputing once every needed tensor is back.
    """

    engine: Engine = "hooks"
    preserve_rng_state: bool = True
    determinism_check: DeterminismCheck = "metadata"
    early_stop: bool = True
    name: str = "recompute"

    def __post_init__(self) -> None:
        check_engine_options(
            "remat.recompute",
            self.engine,
            self.determinism_check,
            preserve_rng_state=self.preserve_rng_state,
            early_stop=self.early_stop,
        )

    def run(self, forward, args, kwargs):
        if is_compiling():
            return traceable_checkpoint(
                forward, args, kwargs, preserve_rng_state=self.preserve_rng_state
            )
        return run_checkpoint(
            forward,
            args,
            kwargs,
            engine=self.engine,
            preserve_rng_state=self.preserve_rng_state,
            determinism_check=self.determinism_check,
            early_stop=self.early_stop,
        )


@dataclass(frozen=True, kw_only=True)
class Composed(Treatment):
    """Treatments nested in one region, outermost first: ``Composed((offload(),
    recompute()))`` recomputes the region and offloads what its checkpoint keeps (its
    inputs), as transformers' ``activation_checkpointing_enable(offload=True)`` does."""

    parts: tuple[Treatment, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.parts or not all(isinstance(t, Treatment) for t in self.parts):
            raise TypeError(f"remat.Composed: parts must be treatments, got {self.parts!r}")
        if not self.name:
            object.__setattr__(self, "name", "+".join(t.name for t in self.parts))

    def run(self, forward, args, kwargs):
        for treatment in reversed(self.parts[1:]):
            forward = functools.partial(treatment.run_forward, forward)
        return self.parts[0].run(forward, args, kwargs)

    def check(self, model: nn.Module, regions: list[tuple[str, nn.Module]]) -> None:
        for treatment in self.parts:
            treatment.check(model, regions)


def recompute(**options: Any) -> Recompute:
    """Full recomputation of each selected region; options as :class:`Recompute`."""
    unknown = sorted(
        set(options) - {"engine", "preserve_rng_state", "determinism_check", "early_stop"}
    )
    if unknown:
        raise TypeError(f"remat.recompute: unknown option(s) {', '.join(map(repr, unknown))}")
    return Recompute(**options)


class _DefaultBlocks(Selector):
    """The children of the model's repeated-block lists (``every(1)``)."""

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return every(1).select(model)


@dataclass(frozen=True)
class Policy:
    """A selector and the treatment its regions get."""

    selector: Selector
    treatment: Treatment = field(default_factory=Recompute)

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Treatment]]:
        """``(qualified name, module, treatment)`` for every region of ``model``."""
        return [(fqn, m, self.treatment) for fqn, m in self.selector.select(model)]


def as_policy(value: Any) -> Policy:
    """Accept a Policy, a Treatment (default blocks), or anything :func:`as_selector` takes."""
    if isinstance(value, Policy) or callable(getattr(value, "assign", None)):
        return value  # anything that assigns its own (fqn, module, treatment) roles
    if isinstance(value, Treatment):
        return Policy(selector=_DefaultBlocks(), treatment=value)
    return Policy(selector=as_selector(value), treatment=Recompute())
