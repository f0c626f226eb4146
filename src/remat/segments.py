"""Chen et al.'s √n segments: checkpoint runs of consecutive blocks as one region.

Per-block checkpointing keeps every block's input. Chen et al. ("Training Deep Nets with
Sublinear Memory Cost", 2016) instead cut a chain of n blocks into segments of about √n
blocks and keep only each segment's input; in backward a whole segment is recomputed.

A model's forward calls its blocks one by one (``for block in self.blocks: x = block(x)``),
so a segment cannot be one call. remat makes the segment's first block (the head) run the
whole segment under one checkpoint, chaining the blocks' outputs, and the other blocks
(followers) hand back the segment's output when the model calls them. Followers check that
they are called in order, on the output of the block before them, with the same other
arguments as the head: if the model does anything else between its blocks, they raise
``CheckpointError`` rather than compute something different.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from remat.errors import CheckpointError
from remat.policies import (
    Policy,
    Recompute,
    Selector,
    Treatment,
    block_lists,
    sqrt_segment_length,
)

__all__ = ["Segments", "segments", "sqrt"]


@dataclass(eq=False)
class _SegmentRun:
    """State shared by a segment's head and followers during one forward pass."""

    name: str
    blocks: list[nn.Module]
    output: Any = None
    members: frozenset[int] = frozenset()  # ids of its blocks, to tell nested segments
    extra: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    next_index: int = 0  # the follower expected to be called next


# The segment whose runner is calling one of its blocks right now. A follower of segment S
# does the real work when that caller is S or a segment nested inside S (a nested segment
# is also recomputed on its own in backward, outside S's run); called by the model's own
# forward or by a segment around S, it hands back S's output (S's head already ran it).
_calling = threading.local()


def _chained(out: Any) -> Any:
    """What the next block receives from a block's output: the output, or its first item."""
    return out[0] if isinstance(out, tuple) else out


def _run_segment(run: _SegmentRun, head_forward: Callable[..., Any], *args: Any, **kwargs: Any):
    out = head_forward(*args, **kwargs)
    for block in run.blocks[1:]:
        previous = getattr(_calling, "run", None)
        _calling.run = run
        try:
            out = block(_chained(out), *args[1:], **kwargs)
        finally:
            _calling.run = previous
    return out


@dataclass(frozen=True, eq=False)
class _Head(Treatment):
    run_state: _SegmentRun
    inner: Recompute = field(default_factory=Recompute)
    name: str = "segment"

    def run(self, forward, args, kwargs):
        run = self.run_state
        partial = functools.partial(_run_segment, run, forward)
        out = self.inner.run(partial, args, kwargs)
        run.output, run.extra, run.next_index = out, (args[1:], kwargs), 1
        return out


@dataclass(frozen=True, eq=False)
class _Follower(Treatment):
    run_state: _SegmentRun
    index: int
    name: str = "segment"

    def run(self, forward, args, kwargs):
        run = self.run_state
        caller = getattr(_calling, "run", None)
        if caller is not None and caller.members <= run.members:  # S or nested in S calls
            return forward(*args, **kwargs)
        expected_args, expected_kwargs = run.extra or ((), {})
        in_order = run.next_index == self.index and args and args[0] is _chained(run.output)
        same_rest = len(args) - 1 == len(expected_args) and all(
            a is b for a, b in zip(args[1:], expected_args)
        )
        same_kwargs = kwargs.keys() == expected_kwargs.keys() and all(
            kwargs[k] is expected_kwargs[k] for k in kwargs
        )
        if not (in_order and same_rest and same_kwargs):
            raise CheckpointError(
                f"remat.sqrt: block {self.index} of segment '{run.name}' was not called in "
                "order on the previous block's output with the same other arguments as the "
                "segment's first block, so the segment cannot be run as one region. Use "
                "remat.every(1) for this model instead."
            )
        run.next_index += 1
        out = run.output
        if run.next_index == len(run.blocks):
            # Handed on for the last time: holding it longer would keep the segment's output
            # alive through the whole backward (the model may well free it much earlier).
            run.output, run.extra = None, None
        return out


@dataclass(frozen=True)
class Segments(Policy):
    """Checkpoint segments of ``length`` consecutive blocks (``None``: ceil(√n))."""

    selector: Selector = field(default_factory=Selector)
    treatment: Treatment = field(default_factory=Recompute)
    length: int | None = None

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Treatment]]:
        out: list[tuple[str, nn.Module, Treatment]] = []
        for fqn, blocks in block_lists(model):
            children = list(blocks.named_children())
            n = len(children)
            length = self.length or sqrt_segment_length(n)
            prefix = f"{fqn}." if fqn else ""
            for start in range(0, n, length):
                part = children[start : start + length]
                name = f"{prefix}{part[0][0]}-{part[-1][0]}"
                modules = [m for _, m in part]
                run = _SegmentRun(name=name, blocks=modules, members=frozenset(map(id, modules)))
                inner = self.treatment if isinstance(self.treatment, Recompute) else Recompute()
                out.append((prefix + part[0][0], part[0][1], _Head(run, inner)))
                out.extend(
                    (prefix + child_name, child, _Follower(run, i))
                    for i, (child_name, child) in enumerate(part[1:], start=1)
                )
        return out


def segments(length: int) -> Segments:
    """Checkpoint runs of ``length`` consecutive blocks of each repeated-block list."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"remat.segments: length must be a positive integer, got {length!r}")
    return Segments(length=length)


def sqrt() -> Segments:
    """Chen et al.'s √n segments of each repeated-block list (length ceil(√n))."""
    return Segments()
