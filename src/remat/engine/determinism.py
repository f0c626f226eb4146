"""Checks that recomputation reproduced the tensors the forward pass saved.

``"metadata"`` compares shape, dtype, device and the op that produced each tensor (a Python
branch that took the other way, ``tanh`` against ``sigmoid``, saves tensors of one shape from
different ops); ``"values"`` also compares a fingerprint of the values (exact sums in
float64, kept on the tensor's device so the forward never synchronises). ``"none"`` records
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from remat.errors import CheckpointError

DETERMINISM_CHECKS = ("metadata", "values", "none")


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """What the forward pass knew about one saved tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    op: str
    fingerprint: Tensor | None = None
    # Produced by an op that autograd recorded (not a leaf or an input taken from outside,
    # which an engine may hand to the recomputation as a fresh alias of another kind).
    computed: bool = False

    def metadata(self) -> str:
        return f"shape={list(self.shape)}, dtype={self.dtype}, device={self.device}"

    def same_as(self, other: TensorRecord) -> bool:
        if (self.shape, self.dtype, self.device) != (other.shape, other.dtype, other.device):
            return False
        if self.computed and other.computed and _kind(self.op) != _kind(other.op):
            return False
        if self.fingerprint is None or other.fingerprint is None:
            return True
        return bool(torch.equal(self.fingerprint.isnan(), other.fingerprint.isnan())) and bool(
            torch.equal(self.fingerprint.nan_to_num(), other.fingerprint.nan_to_num())
        )


def producer_name(x: Tensor) -> str:
    """The autograd op that produced ``x`` (``"addmm"``), or what kind of leaf it is."""
    node = x.grad_fn
    if node is None:
        return "a leaf tensor (parameter or input)" if x.requires_grad else "a tensor without grad"
    name = node.name()
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)].lower()
    return name


# Ops that only make a view. Which one a composite op picks depends on whether a dispatch
# mode is active (``reshape`` is ``view`` under a MemoryTracker, ``_reshape_alias`` without),
# and a forward may run under a mode its recomputation does not.
_VIEWS = frozenset({"view", "reshapealias", "unsafeview", "alias", "asstrided"})


def _kind(op: str) -> str:
    return "a view" if op in _VIEWS else op


def _fingerprint(x: Tensor) -> Tensor:
    # Three exact float64 reductions: total, energy, position-weighted total. Any changed
    # element or permutation changes at least one of them in practice.
    with torch.no_grad():
        flat = _dense_values(x.detach())
        if flat.is_complex():
            flat = torch.view_as_real(flat)
        flat = flat.reshape(-1).to(torch.float64)
        position = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
        return torch.stack([flat.sum(), (flat * flat).sum(), (flat * position).sum()])


def _dense_values(x: Tensor) -> Tensor:
    """What a fingerprint sums: the tensor, or for a sparse one its indices and values."""
    if x.layout == torch.sparse_coo:
        x = x.coalesce()
        values = x.values()
        values = torch.view_as_real(values) if values.is_complex() else values
        return torch.cat([x.indices().reshape(-1), values.reshape(-1)]).to(torch.float64)
    if x.layout != torch.strided:  # compressed sparse layouts, nested tensors
        return x.to_dense()
    return x


def record(x: Tensor, check: str) -> TensorRecord:
    """Describe ``x`` for a later comparison under determinism check ``check``."""
    return TensorRecord(
        shape=tuple(x.shape),
        dtype=x.dtype,
        device=x.device,
        op=producer_name(x),
        fingerprint=_fingerprint(x) if check == "values" and not x.is_meta else None,
        computed=x.grad_fn is not None,
    )


def mismatch_error(
    region: str, what: str, position: int, forward: TensorRecord, recomputed: TensorRecord
) -> CheckpointError:
    same_metadata = (
        forward.shape == recomputed.shape
        and forward.dtype == recomputed.dtype
        and forward.device == recomputed.device
    )
    if not same_metadata:
        detail = ""
    elif forward.op != recomputed.op:
        detail = " (same metadata, produced by another op)"
    else:
        detail = " (same metadata, different values)"
    return CheckpointError(
        f"remat.checkpoint: recomputing {region} did not reproduce the forward pass: "
        f"{what} #{position} differs{detail}.\n"
        f"  forward:   produced by {forward.op}, {forward.metadata()}\n"
        f"  recompute: produced by {recomputed.op}, {recomputed.metadata()}\n"
        "The checkpointed code must run the same ops on the same data both times (look for "
        "control flow on global state, non-deterministic ops, or inputs changed in place). "
        'determinism_check="none" skips this check.'
    )


def count_error(region: str, forward: int, recomputed: int) -> CheckpointError:
    return CheckpointError(
        f"remat.checkpoint: recomputing {region} saved {recomputed} tensors for backward, "
        f"but its forward saved {forward}. The checkpointed code must run the same ops both "
        "times (look for control flow that depends on global state or on grad mode)."
    )
