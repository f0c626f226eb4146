"""Op-level (selective) checkpointing: keep the outputs of some ops, recompute the rest.

``remat.ops("save-matmuls")`` or ``remat.ops(save=["mm", "addmm"])``, on the replay engine
(PyTorch's selective checkpointing on remat's hooks engine) or on the op tape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from remat.engine.checkpointing import run_checkpoint
from remat.engine.determinism import DETERMINISM_CHECKS, DeterminismCheck
from remat.engine.region_modules import describe_fn
from remat.engine.tape import checkpoint_tape
from remat.errors import check_choice
from remat.policy.treatments import (
    Treatment,
    is_compiling,
    traceable_checkpoint,
)

# How op-level checkpointing recomputes (see Ops).
OpEngine = Literal["replay", "tape"]
OP_ENGINES: tuple[str, ...] = get_args(OpEngine)


__all__ = ["OP_ENGINES", "OP_PRESETS", "OpEngine", "Ops", "draws_random_numbers", "ops"]


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
      outputs, when it is unpacked (``remat.engine.tape``). It skips the replay's fixed
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
    determinism_check: DeterminismCheck = "metadata"
    engine: OpEngine = "replay"
    name: str = "ops"

    def __post_init__(self) -> None:
        check_choice("remat.ops", "engine", self.engine, OP_ENGINES)
        check_choice("remat.ops", "determinism_check", self.determinism_check, DETERMINISM_CHECKS)

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
        if is_compiling():
            # A partial, not a bound method or closure: the context_fn forms dynamo accepts.
            contexts = functools.partial(type(self)._contexts, self)
            return traceable_checkpoint(forward, args, kwargs, context_fn=contexts)
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
    return Ops(
        save=save_set,
        recompute=recompute_set,
        preset=preset,
        determinism_check=determinism_check,
        engine=engine,
    )
