"""A device's memory as a plan's budget: what the job holds through training (parameters,
optimizer state, master weights, gathered shards, the batch), the headroom the framework
needs beyond its tensors, and what the training step's new bytes get.

Every plan output speaks of the budget the user gave: ``--budget 80GB`` is the device's
memory, so "needs" and "fits" are in that quantity, never in the step's share of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from remat.solver.budget import parse_budget
from remat.solver.units import fmt_bytes
from remat.targets.devices import Target

__all__ = ["DeviceBudget", "Headroom", "default_headroom", "parse_headroom"]

# What a CUDA process holds outside PyTorch's tensors: the CUDA context and library
# workspaces (cuBLAS, cuDNN), about 0.5 GB on an H100; NCCL's communicator buffers when
# several ranks talk, about 0.5 GB more; and what the caching allocator reserves beyond the
# bytes it hands out (fragmentation), taken as 5% of the device.
CUDA_CONTEXT_BYTES = 5 * 10**8
NCCL_BYTES = 5 * 10**8
ALLOCATOR_SHARE = 0.05


class Headroom(NamedTuple):
    """Memory kept free of a device's budget: ``fixed_bytes`` plus ``share`` of it."""

    fixed_bytes: int = 0
    share: float = 0.0

    def of(self, device_bytes: int) -> int:
        return self.fixed_bytes + int(self.share * device_bytes)

    def describe(self) -> str:
        parts = [fmt_bytes(self.fixed_bytes)] if self.fixed_bytes else []
        parts += [f"{self.share:.0%} of the budget"] if self.share else []
        return " + ".join(parts) or "none"


def default_headroom(target: Target | None, device: str, world_size: int) -> Headroom:
    """The headroom a GPU needs (``CUDA_CONTEXT_BYTES``, ``NCCL_BYTES`` with several ranks,
    ``ALLOCATOR_SHARE`` of the device); none on the CPU, whose tensors are the process's
    only memory that remat's budget counts."""
    gpu = target.kernels == "cuda" if target is not None else device.startswith("cuda")
    if not gpu:
        return Headroom()
    nccl = NCCL_BYTES if world_size > 1 else 0
    return Headroom(CUDA_CONTEXT_BYTES + nccl, ALLOCATOR_SHARE)


def parse_headroom(text: str, device_bytes: int) -> Headroom:
    """``--headroom``: a size (``2GB``), bytes, or a percentage of the budget (``5%``).

    Raises:
        ValueError: it does not parse, or it leaves nothing of ``device_bytes``.
    """
    text = text.strip()
    if text.endswith("%"):
        share = parse_budget(text, baseline_bytes=10**12) / 10**12 if text != "0%" else 0.0
        headroom = Headroom(0, share)
    else:
        headroom = Headroom(0 if text == "0" else parse_budget(text))
    if device_bytes and headroom.of(device_bytes) >= device_bytes:
        raise ValueError(
            f"--headroom {text}: {fmt_bytes(headroom.of(device_bytes))} leaves nothing of the "
            f"budget {fmt_bytes(device_bytes)}"
        )
    return headroom


@dataclass(frozen=True)
class DeviceBudget:
    """A device's memory split between the job's state, the headroom and the step.

    Attributes:
        device_bytes: the budget as given (``--budget``): the device's memory.
        headroom: kept free for the CUDA context, NCCL and the allocator
            (``headroom_bytes`` of this budget).
        resident_bytes: held through the job: parameters, optimizer state, master
            weights, gathered FSDP units and the batch.
        ranks: ``"rank"`` under FSDP, else ``"device"``: what the figures are per.
    """

    device_bytes: int
    headroom: Headroom
    resident_bytes: int
    ranks: str = "device"

    @property
    def headroom_bytes(self) -> int:
        return self.headroom.of(self.device_bytes)

    @property
    def step_bytes(self) -> int:
        """What the training step's new bytes (activations, gradients) may take."""
        return self.device_bytes - self.headroom_bytes - self.resident_bytes

    def total_for(self, step_peak_bytes: int) -> int:
        """The device's peak for a step peaking at ``step_peak_bytes``, headroom aside."""
        return step_peak_bytes + self.resident_bytes

    def needed_for(self, step_peak_bytes: int) -> int:
        """The least budget that leaves a step peaking at ``step_peak_bytes`` room, its
        headroom (which grows with the budget when it is a share of it) included."""
        fixed = step_peak_bytes + self.resident_bytes + self.headroom.fixed_bytes
        return math.ceil(fixed / (1 - self.headroom.share))

    def verdict(self, step_peak_bytes: int) -> str:
        """``fits: 74.92 GB of 80.00 GB per rank (5.08 GB free, 5.00 GB of it headroom)``."""
        used = self.total_for(step_peak_bytes)
        free = self.device_bytes - used
        room = f", {fmt_bytes(self.headroom_bytes)} of it headroom" if self.headroom_bytes else ""
        if used + self.headroom_bytes <= self.device_bytes:
            return (
                f"fits: {fmt_bytes(used)} of {fmt_bytes(self.device_bytes)} per {self.ranks} "
                f"({fmt_bytes(free)} free{room})"
            )
        return (
            f"does not fit: {fmt_bytes(used)} per {self.ranks}"
            f"{f' + {fmt_bytes(self.headroom_bytes)} headroom' if self.headroom_bytes else ''}"
            f"; needs --budget >= {fmt_bytes(self.needed_for(step_peak_bytes), round_up=True)}"
        )

    def split(self) -> str:
        """How the budget is shared, one line."""
        room = f" - headroom {fmt_bytes(self.headroom_bytes)}" if self.headroom_bytes else ""
        if self.headroom.fixed_bytes and self.headroom.share:
            room += f" ({self.headroom.describe()})"
        return (
            f"budget {fmt_bytes(self.device_bytes)} per {self.ranks}{room} - state and inputs "
            f"{fmt_bytes(self.resident_bytes)} = {fmt_bytes(self.step_bytes)} for the step"
        )
