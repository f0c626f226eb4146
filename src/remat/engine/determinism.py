"""Checks that recomputation reproduced the tensors the forward pass saved.

``"metadata"`` compares shape, dtype, device and the op that produced each tensor (a Python
branch that took the other way, ``tanh`` against ``sigmoid``, saves tensors of one shape from
different ops); ``"values"`` also compares a fingerprint of the values (exact sums in
float64, kept on the tensor's device so the forward never synchronises). ``"none"`` records
nothing.

Random ops are replayed from the RNG state captured before the forward, which another
thread drawing from the same generator (``torch.rand`` in a data-augmentation thread)
defeats without changing any metadata. So ``"metadata"`` also checks the values of the
tensors saved after the replayed generators drew (:class:`remat.engine.replay.RandomDraws`;
before that, nothing saved can depend on a draw) that autograd does not differentiate (a
dropout's mask or noise, indices: their bits follow from the draw, while a recomputed float
activation may differ in its last bits), by a checksum of their bits: one pass over the
tensor, no copy, no synchronisation in the forward. A region that draws nothing pays one
look at the generators per saved tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from remat.errors import CheckpointError

DeterminismCheck = Literal["metadata", "values", "none"]
DETERMINISM_CHECKS: tuple[str, ...] = get_args(DeterminismCheck)


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
    # Saved after the replayed generators drew: its values may hold drawn numbers, so a
    # difference in them is most likely a draw the recomputation did not repeat.
    after_draw: bool = False
    # The checksum of its bits (``_bits``) taken for that reason under "metadata".
    bits: tuple[Tensor, ...] | None = None

    def metadata(self) -> str:
        return f"shape={list(self.shape)}, dtype={self.dtype}, device={self.device}"

    def same_as(self, other: TensorRecord) -> bool:
        if (self.shape, self.dtype, self.device) != (other.shape, other.dtype, other.device):
            return False
        if self.computed and other.computed and _kind(self.op) != _kind(other.op):
            return False
        # Value comparisons synchronise (in backward only), outside the dispatch modes the
        # recomputation may run under: selective checkpointing's counts the ops it sees.
        if self.bits is not None and other.bits is not None:
            with _disable_current_modes():
                if len(self.bits) != len(other.bits) or not all(
                    torch.equal(a, b) for a, b in zip(self.bits, other.bits)
                ):
                    return False
        if self.fingerprint is None or other.fingerprint is None:
            return True
        with _disable_current_modes():
            return bool(torch.equal(self.fingerprint.isnan(), other.fingerprint.isnan())) and (
                bool(torch.equal(self.fingerprint.nan_to_num(), other.fingerprint.nan_to_num()))
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


# A float tensor's zero pattern is counted this many rows at a time (a bool copy of a
# chunk, not of the whole tensor).
_ZERO_CHUNKS = 16


def _zero_pattern(x: Tensor) -> tuple[Tensor, ...]:
    """Where a float tensor is exactly zero, counted per row of about sqrt(n) elements:
    what another draw of a dropout changes (its mask, the noise ``bernoulli_`` made and
    scaled, the activations it zeroed), while a float kernel rerun on a copy at another
    address may change last bits (a layer norm's mean and rstd: vectorised reductions
    depend on the alignment) but not which values are exactly zero."""
    with torch.no_grad():
        flat = _dense_block(_dense_values(x.detach())).reshape(-1)
        n = flat.numel()
        if n <= _SMALL_WORDS:
            return (flat == 0,)
        columns = 1 << (n.bit_length() // 2)
        rows = n // columns
        grid = flat[: rows * columns].view(rows, columns)
        step = max(1, -(-rows // _ZERO_CHUNKS))
        counts = torch.cat([(grid[i : i + step] == 0).sum(1) for i in range(0, rows, step)])
        return counts, flat[rows * columns :] == 0


# A tensor of at most this many words is its own checksum.
_SMALL_WORDS = 256
# The words a checksum sums, widest first: the widest that divides the tensor's bytes.
_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _bits(x: Tensor) -> tuple[Tensor, ...] | None:
    """A checksum of ``x``'s bits that any change of the numbers a random op drew changes:
    row sums of its memory, read as int64 words in rows of about sqrt(n) words; for a
    float tensor, of where it is zero (``_zero_pattern``).

    Integer sums are exact in any order (wrapping), so a recomputation with the same bits
    gives the same checksum on any device. Another draw changes about every other element
    of a mask or noise tensor and of what is computed from it: some row sum then differs,
    short of a chance of order 1e-20 (a tensor of fewer than ``_SMALL_WORDS`` words is
    kept whole). It keeps about 2 sqrt(n) words and reads ``x`` once; it copies ``x`` where
    its memory is not one dense block or not aligned to the word, and the sum widens words
    narrower than 8 bytes (a size not a multiple of 8 bytes) in a copy. ``None`` where no
    draw of the region can be: a parameter or a view of one; and for tensor subclasses (an
    op on a DTensor may communicate) and meta tensors.
    """
    if type(x) not in (Tensor, nn.Parameter) or x.is_meta:
        return None
    base = x._base if x._is_view() else x
    if isinstance(base, nn.Parameter):
        return None
    if x.is_floating_point() or x.is_complex():
        return _zero_pattern(x)
    with torch.no_grad():
        raw = _dense_block(_dense_values(x.detach())).reshape(-1).view(torch.uint8)
        dtype = next(d for d in _WORDS if raw.numel() % d.itemsize == 0)
        if raw.storage_offset() % dtype.itemsize:  # a view at an odd offset (x[1:])
            raw = raw.clone()
        words = raw.view(dtype)
        n = words.numel()
        if n <= _SMALL_WORDS:
            return (words.clone(),)
        columns = 1 << (n.bit_length() // 2)
        rows = n // columns
        grid = words[: rows * columns].view(rows, columns)
        return grid.sum(1, dtype=torch.int64), words[rows * columns :].clone()


def _dense_block(x: Tensor) -> Tensor:
    """``x`` as one contiguous block of memory: itself, its dimensions in memory order (a
    transpose), or a copy. Broadcast dimensions (stride 0) hold one value: one is kept."""
    if x.is_contiguous():
        return x
    for dim in range(x.dim()):
        if x.stride(dim) == 0:
            x = x.narrow(dim, 0, min(1, x.size(dim)))
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    permuted = x.permute(order)
    return permuted if permuted.is_contiguous() else permuted.contiguous()


def record(x: Tensor, check: str, *, after_draw: bool = False) -> TensorRecord:
    """Describe ``x`` for a later comparison under determinism check ``check``.

    ``after_draw``: ``x`` was saved after the replayed generators drew, so ``"metadata"``
    takes a checksum of its values too.
    """
    fingerprint = bits = None
    if check == "values" and not x.is_meta:
        # Outside any dispatch mode (selective checkpointing's, a MemoryTracker): the
        # checksum's ops are not the region's.
        with _disable_current_modes():
            fingerprint = _fingerprint(x)
    elif after_draw and check == "metadata" and x.grad_fn is None and not x.requires_grad:
        # Only what autograd does not differentiate: a dropout's mask or noise, indices
        # (and a norm's statistics). Their values follow from the draw, while a float
        # activation recomputed by a matmul may differ in its last bits (MKL's results
        # depend on alignment); of a float tensor, only where it is zero is compared.
        with _disable_current_modes():
            bits = _bits(x)
    return TensorRecord(
        shape=tuple(x.shape),
        dtype=x.dtype,
        device=x.device,
        op=producer_name(x),
        fingerprint=fingerprint,
        computed=x.grad_fn is not None,
        after_draw=after_draw,
        bits=bits,
    )


def record_again(x: Tensor, forward: TensorRecord, check: str) -> TensorRecord:
    """Describe the recomputed ``x`` as the forward described it (``forward``)."""
    return record(x, check, after_draw=forward.bits is not None)


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
        if forward.after_draw:
            return _draw_error(region, what, position, forward)
    return CheckpointError(
        f"remat.checkpoint: recomputing {region} did not reproduce the forward pass: "
        f"{what} #{position} differs{detail}.\n"
        f"  forward:   produced by {forward.op}, {forward.metadata()}\n"
        f"  recompute: produced by {recomputed.op}, {recomputed.metadata()}\n"
        "The checkpointed code must run the same ops on the same data both times (look for "
        "control flow on global state, non-deterministic ops, or inputs changed in place). "
        'determinism_check="none" skips this check.'
    )


def _draw_error(region: str, what: str, position: int, forward: TensorRecord) -> CheckpointError:
    return CheckpointError(
        f"remat.checkpoint: recomputing {region} did not reproduce the forward pass: {what} "
        f"#{position} ({forward.op}, {forward.metadata()}) has other values, and it was saved "
        "after the region drew random numbers. The region's random ops (dropout) drew "
        "different numbers in the recomputation than in the forward: another thread used "
        "the RNG meanwhile (the CPU generator and each CUDA device's are shared by all "
        "threads; a data-loading or augmentation thread calling torch.rand draws from it "
        "between the capture of the RNG state and the region's draw, in the forward or in "
        "the recomputation). Give that thread its own torch.Generator "
        "(torch.rand(..., generator=g)), or keep the random ops' outputs instead of "
        "recomputing them (remat.ops(..., engine='tape')). A nondeterministic op after the "
        "draw (index_add_ or scatter_add_ on CUDA: torch.use_deterministic_algorithms) "
        'gives this error too; determinism_check="none" skips the check.'
    )


def count_error(region: str, forward: int, recomputed: int) -> CheckpointError:
    return CheckpointError(
        f"remat.checkpoint: recomputing {region} saved {recomputed} tensors for backward, "
        f"but its forward saved {forward}. The checkpointed code must run the same ops both "
        "times (look for control flow that depends on global state or on grad mode)."
    )
