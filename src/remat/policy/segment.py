"""Chen et al.'s √n segments: checkpoint runs of consecutive blocks as one region.

Per-block checkpointing keeps every block's input. Chen et al. ("Training Deep Nets with
Sublinear Memory Cost", 2016) instead cut a chain of n blocks into segments of about √n
blocks and keep only each segment's input; in backward a whole segment is recomputed.

A model's forward calls its blocks one by one (``for block in self.blocks: x = block(x)``),
so a segment cannot be one call. Each block of a segment runs its calls into one shared
checkpointed region (a frame of the hooks engine): the first block opens a new region, and a
later block that takes an output of the open region carries it on. What the model does is
what gets recomputed: backward reruns the calls the model made, in their order, from the
tensors they took from outside the region. A model that stops early, skips blocks
(LayerDrop) or computes something between its blocks is recomputed exactly as it ran; a
block whose input does not come from the open region starts a region of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat.engine.checkpointing import run_checkpoint
from remat.engine.hooks import Frame
from remat.policy.selectors import Selector, block_lists, sqrt_segment_length
from remat.policy.treatments import Policy, Recompute, Treatment, is_compiling, traceable_checkpoint

__all__ = ["Segments", "segments", "sqrt"]


class Segment:
    """One segment of blocks: its name, its recompute options and its open region."""

    def __init__(self, name: str, options: Recompute) -> None:
        if options.engine != "hooks":
            raise ValueError(
                f"remat segments run on the hooks engine; got engine={options.engine!r} for "
                f"segment '{name}'"
            )
        self.name = name
        self.options = options
        self._open: weakref.ref[Frame] | None = None  # the graph owns the frame

    def frame_for(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Frame:
        """The region block ``index``'s call runs in: the open one when the call continues
        it, else a new one."""
        frame = self._open() if self._open is not None else None
        if index == 0 or frame is None or not frame.continues(args, kwargs):
            options = self.options
            frame = Frame(f"segment '{self.name}'", options.early_stop, options.determinism_check)
            self._open = weakref.ref(frame)
        return frame

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}  # a copy has no open region

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["options"])


@dataclass(frozen=True, eq=False)
class SegmentMember(Treatment):
    """Block ``index`` of ``segment``: its calls run in the segment's open region."""

    segment: Segment
    index: int
    name: str = "segment"

    def run(self, forward, args, kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        options = self.segment.options
        if is_compiling():  # dynamo traces one call at a time: each block its own region
            return traceable_checkpoint(
                forward, args, kwargs, preserve_rng_state=options.preserve_rng_state
            )
        return run_checkpoint(
            forward,
            args,
            kwargs,
            preserve_rng_state=options.preserve_rng_state,
            determinism_check=options.determinism_check,
            early_stop=options.early_stop,
            frame=self.segment.frame_for(self.index, args, kwargs),
        )


def segment_roles(
    name: str, members: Sequence[tuple[str, nn.Module]], options: Recompute | None = None
) -> list[tuple[str, nn.Module, Treatment]]:
    """``(qualified name, module, treatment)`` of each block of one segment."""
    segment = Segment(name, options or Recompute())
    return [(fqn, module, SegmentMember(segment, i)) for i, (fqn, module) in enumerate(members)]


@dataclass(frozen=True)
class Segments(Policy):
    """Checkpoint segments of ``length`` consecutive blocks (``None``: ceil(√n))."""

    selector: Selector = field(default_factory=Selector)
    treatment: Treatment = field(default_factory=Recompute)
    length: int | None = None

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Treatment]]:
        out: list[tuple[str, nn.Module, Treatment]] = []
        options = self.treatment if isinstance(self.treatment, Recompute) else Recompute()
        for fqn, blocks in block_lists(model):
            children = list(blocks.named_children())
            length = self.length or sqrt_segment_length(len(children))
            prefix = f"{fqn}." if fqn else ""
            for start in range(0, len(children), length):
                part = children[start : start + length]
                name = f"{prefix}{part[0][0]}-{part[-1][0]}"
                members = [(prefix + child, m) for child, m in part]
                out.extend(segment_roles(name, members, options))
        return out


def segments(length: int) -> Segments:
    """Checkpoint runs of ``length`` consecutive blocks of each repeated-block list."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"remat.segments: length must be a positive integer, got {length!r}")
    return Segments(length=length)


def sqrt() -> Segments:
    """Chen et al.'s √n segments of each repeated-block list (length ceil(√n))."""
    return Segments()
