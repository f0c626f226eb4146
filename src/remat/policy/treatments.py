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

import fnmatch
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from remat.engine.checkpointing import ENGINES, run_checkpoint
from remat.engine.determinism import DETERMINISM_CHECKS
from remat.engine.replay import describe_fn
from remat.engine.tape import checkpoint_tape

__all__ = [
    "OP_ENGINES",
    "OP_PRESETS",
    "Composed",
    "Ops",
    "Policy",
    "Recompute",
    "Selector",
    "Treatment",
    "as_policy",
    "block_lists",
    "by_name",
    "by_type",
    "every",
    "ops",
    "recompute",
    "where",
]

# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------


class Selector:
    """Chooses the modules that become checkpointed regions."""

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of every selected module, in ``named_modules`` order."""
        return [(fqn, m) for fqn, m in model.named_modules() if self.matches(m, fqn, model)]

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        raise NotImplementedError

    def __and__(self, other: Any) -> Any:
        if isinstance(other, Treatment):
            return Policy(selector=self, treatment=other)
        return _AllOf((self, as_selector(other)))

    def __rand__(self, other: Any) -> Any:
        return as_selector(other) & self

    def __or__(self, other: Any) -> Selector:
        return _AnyOf((self, as_selector(other)))

    def __ror__(self, other: Any) -> Selector:
        return as_selector(other) | self


@dataclass(frozen=True)
class _AllOf(Selector):
    parts: tuple[Selector, ...]

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = [{fqn for fqn, _ in part.select(model)} for part in self.parts]
        names = set.intersection(*chosen)
        return [(fqn, m) for fqn, m in model.named_modules() if fqn in names]


@dataclass(frozen=True)
class _AnyOf(Selector):
    parts: tuple[Selector, ...]

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        names = set().union(*({fqn for fqn, _ in part.select(model)} for part in self.parts))
        return [(fqn, m) for fqn, m in model.named_modules() if fqn in names]


@dataclass(frozen=True)
class by_type(Selector):
    """Modules that are instances of any of ``types`` (e.g. ``LlamaDecoderLayer``)."""

    types: tuple[type, ...]

    def __init__(self, *types: type) -> None:
        if not types or not all(isinstance(t, type) for t in types):
            raise TypeError(f"remat.by_type expects module classes, got {types!r}")
        object.__setattr__(self, "types", types)

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return isinstance(module, self.types)


@dataclass(frozen=True)
class by_name(Selector):
    """Modules whose qualified name matches any glob pattern (``"blocks.*"``, ``"*.mlp"``)."""

    patterns: tuple[str, ...]

    def __init__(self, *patterns: str) -> None:
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"remat.by_name expects glob patterns as strings, got {patterns!r}")
        object.__setattr__(self, "patterns", patterns)

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return bool(fqn) and any(fnmatch.fnmatchcase(fqn, p) for p in self.patterns)


@dataclass(frozen=True)
class where(Selector):
    """Modules for which ``predicate(module, fqn)`` is true."""

    predicate: Callable[[nn.Module, str], bool]

    def __post_init__(self) -> None:
        if not callable(self.predicate):
            raise TypeError(
                "remat.where: predicate must be a (module, fqn) -> bool function, got "
                f"{type(self.predicate).__name__} {self.predicate!r}"
            )

    def matches(self, module: nn.Module, fqn: str, model: nn.Module) -> bool:
        return bool(self.predicate(module, fqn))


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList | nn.Sequential]]:
    """The model's repeated-block lists: ModuleLists (and Sequentials) of two or more
    modules of one type, outermost only (a list inside a block of another list is part of
    that block). A ModuleList of several layer types with a common base class of their own
    counts too: hybrid models mix attention and recurrent layers (transformers'
    ``GradientCheckpointingLayer``), where a Sequential of a Linear and a ReLU does not."""
    found: list[tuple[str, nn.ModuleList | nn.Sequential]] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1 and not (
            isinstance(module, nn.ModuleList) and _common_layer_base(list(module)) is not None
        ):
            continue
        if any(fqn.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((fqn, module))
    return found


def _common_layer_base(children: list[nn.Module]) -> type | None:
    """The most specific class all ``children`` are instances of, unless it is nn.Module."""
    for base in type(children[0]).__mro__:
        if base is nn.Module or base is object:
            return None
        if all(isinstance(child, base) for child in children):
            return base
    return None


@dataclass(frozen=True)
class every(Selector):
    """Every ``n``-th block of each repeated-block list (blocks ``offset``, ``offset + n``, …).

    ``every(1)`` is every block, the usual per-layer checkpointing; ``every(2)`` is Hugging
    Face's "every other layer".
    """

    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"remat.every: n must be a positive integer, got {self.n!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int):
            raise TypeError(f"remat.every: offset must be an int, got {self.offset!r}")
        if not 0 <= self.offset < self.n:
            raise ValueError(f"remat.every: offset must be in [0, {self.n}), got {self.offset}")

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = []
        for fqn, blocks in block_lists(model):
            prefix = f"{fqn}." if fqn else ""
            for index, (name, block) in enumerate(blocks.named_children()):
                if index % self.n == self.offset:
                    chosen.append((prefix + name, block))
        return chosen


def as_selector(value: Any) -> Selector:
    """A Selector from a selector, a module class, a glob string or a predicate."""
    if isinstance(value, Selector):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return by_type(value)
    if isinstance(value, str):
        return by_name(value)
    if callable(value):
        return where(value)
    raise TypeError(
        "remat: a module filter must be a Selector (by_type, by_name, every, where), a module "
        f"class, a glob pattern or a (module, fqn) -> bool function; got {type(value).__name__}"
    )


# ---------------------------------------------------------------------------------------
# Treatments
# ---------------------------------------------------------------------------------------


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


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _traceable_checkpoint(forward, args, kwargs, **options: Any) -> Any:
    """The region under ``torch.compile``: ``torch.utils.checkpoint``, which dynamo traces.

    remat's own engine reads the RNG state and enters ``saved_tensors_hooks``, so dynamo would
    break the graph and recompute the compiled region eagerly, saving other tensors.
    Non-reentrant ``torch.utils.checkpoint`` becomes a higher-order op that the compiler
    recomputes inside its own backward graph (with the same op-level save list, through
    ``context_fn``). Buffers are not replayed there: BatchNorm statistics of a compiled
    checkpointed region are updated twice, as with PyTorch's checkpoint.
    """
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)


def _check_engine_options(engine: str, determinism_check: str, flags: dict[str, Any]) -> None:
    if engine not in ENGINES:
        raise ValueError(f"remat: engine={engine!r} does not exist; choose one of {ENGINES}")
    if determinism_check not in DETERMINISM_CHECKS:
        raise ValueError(
            f"remat: determinism_check={determinism_check!r} is not one of {DETERMINISM_CHECKS}"
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"remat: {name} must be a bool, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Recompute(Treatment):
    """Drop every activation of the region and recompute it in backward (full checkpoint).

    Attributes:
        engine: ``"hooks"`` or ``"function"`` (see :func:`remat.checkpoint`).
        preserve_rng_state: replay RNG in recomputation (exact dropout); off saves a little.
        determinism_check: ``"metadata"``, ``"values"`` or ``"none"``.
        early_stop: stop recomputing once every needed tensor is back.
    """

    engine: str = "hooks"
    preserve_rng_state: bool = True
    determinism_check: str = "metadata"
    early_stop: bool = True
    name: str = "recompute"

    def __post_init__(self) -> None:
        _check_engine_options(
            self.engine,
            self.determinism_check,
            {"preserve_rng_state": self.preserve_rng_state, "early_stop": self.early_stop},
        )

    def run(self, forward, args, kwargs):
        if _is_compiling():
            return _traceable_checkpoint(
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


# How op-level checkpointing recomputes (see Ops).
OP_ENGINES = ("replay", "tape")

_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution")
_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
# Named op lists. "save-matmuls" is the selective recompute of Korthikanti et al. 2022:
# keep what is expensive to recompute (matmuls, attention), recompute pointwise ops and norms.
OP_PRESETS: dict[str, tuple[str, ...]] = {
    "save-matmuls": _MATMULS + _ATTENTION,
    "save-attention": _ATTENTION,
    "save-nothing": (),
}


def _resolve_ops(names: Iterable[Any], what: str) -> frozenset[Any]:
    if isinstance(names, (str, torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        raise TypeError(
            f"remat.ops: {what} must be a list of op names, got the single {names!r} "
            f"(did you mean {what}=[{names!r}]?)"
        )
    packets = set()
    for name in names:
        if isinstance(name, torch._ops.OpOverloadPacket):
            packets.add(name)
            continue
        if isinstance(name, torch._ops.OpOverload):
            packets.add(name.overloadpacket)
            continue
        if not isinstance(name, str):
            raise TypeError(f"remat.ops: {what} entries must be op names or aten ops, got {name!r}")
        short = name.removeprefix("aten.").removeprefix("torch.ops.aten.")
        packet = getattr(torch.ops.aten, short, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            raise ValueError(f"remat.ops: unknown op {name!r} in {what} (expected an aten op name)")
        packets.add(packet)
    return frozenset(packets)


def draws_random_numbers(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of an aten op draws from the RNG: a ``nondeterministic_seeded`` op,
    except attention called with ``dropout_p=0`` (tagged for its optional dropout)."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == "dropout_p":
            value = args[position] if position < len(args) else kwargs.get("dropout_p", 0.0)
            return value != 0
    return True


@dataclass(frozen=True, kw_only=True)
class Ops(Treatment):
    """Op-level (selective) checkpointing: keep the outputs of ``save`` ops, recompute the rest.

    Two engines run it:

    - ``"replay"`` (default): PyTorch's selective checkpointing on remat's hooks engine. In
      backward the region's forward is re-run; outputs of saved ops are handed back instead
      of being computed again. Random ops (dropout) are always recomputed, under the
      replayed RNG state, even if listed: a cached one would not draw its numbers again and
      would shift those of every random op after it.
    - ``"tape"``: no re-run. The forward records how to compute each unsaved op's outputs
      again, and each saved tensor backward needs is recomputed alone, from the kept
      outputs, when it is unpacked (``remat._tape_engine``). It skips the replay's fixed
      cost (about 2 ms per transformer block on a CPU) and recomputes only what backward
      reads. Outputs of random ops and of ops that write to a tensor are always kept
      there, since they cannot be recomputed from their arguments, so a region with
      dropout keeps its masks; a tensor a recipe needs that is modified in place later
      raises :class:`~remat.CheckpointError` in backward. Eager only (``torch.compile``
      uses the replay's traceable form).

    Attributes:
        save: ops whose outputs are kept (aten names such as ``"mm"`` or ``aten.mm``).
        recompute: ops always recomputed, even if listed in ``save`` by a preset.
        preset: name in :data:`OP_PRESETS` providing ``save`` (``"save-matmuls"``).
        save_calls: single calls to keep, named ``"<overload>#<k>"`` (the k-th call of that
            overload in the region, e.g. ``"aten.addmm.default#2"``): what plans use.
        engine: ``"replay"`` or ``"tape"`` (above).
    """

    save: frozenset[Any] = field(default_factory=frozenset)
    recompute: frozenset[Any] = field(default_factory=frozenset)
    preset: str | None = None
    save_calls: frozenset[str] = field(default_factory=frozenset)
    determinism_check: str = "metadata"
    engine: str = "replay"
    name: str = "ops"

    def __post_init__(self) -> None:
        if self.engine not in OP_ENGINES:
            raise ValueError(
                f"remat.ops: engine={self.engine!r} is not one of {', '.join(OP_ENGINES)}"
            )

    def _listed(self) -> Callable[..., bool]:
        """``listed(func, recomputing=False)``: whether this call of ``func`` is listed for
        saving, by its ``save_calls`` name (the k-th call of its overload, counted per
        pass) or by its op in ``save`` and not in ``recompute``."""
        calls: dict[tuple[bool, Any], int] = {}
        names: dict[Any, str] = {}

        def listed(func: Any, recomputing: bool = False) -> bool:
            if self.save_calls:
                key = (recomputing, func)
                k = calls.get(key, 0)
                calls[key] = k + 1
                name = names.get(func)
                if name is None:
                    name = names[func] = str(func)
                if f"{name}#{k}" in self.save_calls:
                    return True
            packet = getattr(func, "overloadpacket", func)
            return packet in self.save and packet not in self.recompute

        return listed

    def _saves(self) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], bool]:
        """Whether the tape engine keeps one call's outputs: a listed op or call, or a
        random op (its numbers cannot be drawn again)."""
        listed = self._listed()
        return lambda func, args, kwargs: listed(func) or draws_random_numbers(func, args, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # aten op packets do not pickle (torch.save of a model with ops applied); their
        # qualified names do.
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("save", "recompute"):
            state[name] = sorted(p._qualified_op_name for p in state[name])
        return (_ops_from_state, (state,))

    def _contexts(self) -> tuple[Any, Any]:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        listed = self._listed()

        def policy_fn(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
            saved = listed(func, ctx.is_recompute)  # counts the call even if random
            if draws_random_numbers(func, args, kwargs):
                # Recomputed under the replayed RNG state: a cached random op would not draw
                # its numbers again and shift those of every random op after it.
                return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy_fn)

    def run(self, forward, args, kwargs):
        if _is_compiling():
            # A partial, not a bound method or closure: the context_fn forms dynamo accepts.
            contexts = functools.partial(type(self)._contexts, self)
            return _traceable_checkpoint(forward, args, kwargs, context_fn=contexts)
        if self.engine == "tape":
            return checkpoint_tape(
                forward,
                args,
                kwargs,
                region=describe_fn(forward),
                saves=self._saves(),
                determinism_check=self.determinism_check,
            )
        return run_checkpoint(
            forward,
            args,
            kwargs,
            determinism_check=self.determinism_check,
            context_fn=self._contexts,
        )


def _ops_from_state(state: dict[str, Any]) -> Ops:
    def packet(qualified: str) -> Any:
        namespace, _, name = qualified.partition("::")
        return getattr(getattr(torch.ops, namespace), name)

    for name in ("save", "recompute"):
        state[name] = frozenset(packet(q) for q in state[name])
    return Ops(**state)


def ops(
    preset: str | None = None,
    *,
    save: Iterable[Any] = (),
    recompute: Iterable[Any] = (),
    determinism_check: str = "metadata",
    engine: str = "replay",
) -> Ops:
    """Op-level policy: ``remat.ops("save-matmuls")`` or ``remat.ops(save=["mm", "addmm"])``.

    ``engine="tape"`` recomputes single saved tensors instead of re-running the region (see
    :class:`Ops`).

    Raises:
        ValueError: unknown preset, op name or engine, or an op both saved and recomputed
            explicitly.
    """
    if preset is not None and preset not in OP_PRESETS:
        raise ValueError(f"remat.ops: unknown preset {preset!r}; presets: {', '.join(OP_PRESETS)}")
    explicit_save = _resolve_ops(save, "save")
    save_set = _resolve_ops((*(OP_PRESETS[preset] if preset else ()), *save), "save")
    recompute_set = _resolve_ops(recompute, "recompute")
    conflict = explicit_save & recompute_set
    if conflict:
        names = ", ".join(sorted(str(op) for op in conflict))
        raise ValueError(f"remat.ops: {names} listed in both save= and recompute=")
    if determinism_check not in DETERMINISM_CHECKS:
        raise ValueError(f"remat.ops: determinism_check={determinism_check!r} is not valid")
    return Ops(
        save=save_set,
        recompute=recompute_set,
        preset=preset,
        determinism_check=determinism_check,
        engine=engine,
    )


# ---------------------------------------------------------------------------------------
# Policy = selector + treatment
# ---------------------------------------------------------------------------------------


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


def sqrt_segment_length(n: int) -> int:
    """Chen et al.'s segment length for a chain of ``n`` blocks: ceil(sqrt(n))."""
    return max(1, math.ceil(math.sqrt(n)))
