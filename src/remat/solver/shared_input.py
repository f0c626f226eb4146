"""A tensor several regions of a chain take (an attention mask, rotary tables), counted
once (``SharedInput``): the profile finds them (``profiling/shared_inputs.py``), ``Chain``
holds them and the memory model decides when a plan lets them go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from remat.solver.validation import check_bytes

__all__ = ["SharedInput"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedInput:
    """A tensor several regions take (an attention mask, rotary tables), made outside the
    regions or by one before them all (``made_by``): counted once, here, and in none of
    its takers' bytes.

    It is live through the forward. In the backward (and the tail before it) it is live
    only while something holds it: ``held_outside`` (the model, or an op outside the
    regions, keeps it), or a region taking it whose backward has not run yet and that holds
    it until then: under its own checkpoint (any option but store), inside a segment, or,
    stored, when autograd saves it (``saved_by``). A mask only odd layers take, which
    attention adds and does not save, dies once the first odd layer's backward is done
    when those layers recompute, and with the forward when they are stored.

    The first region that saves it (``saved_by[0]``), stored, with no checkpoint of a
    taker before it holding it, is the last to hold it: its backward frees it part-way,
    where autograd lets go of what saved it (the first attention of a layer saves the
    rotary tables; the parameter gradients of the projections before it come after), and
    may peak after that. ``freed_before_peak`` says by how much of its bytes that backward
    then peaks lower than with it held throughout (as a checkpoint holds it).

    Attributes:
        nbytes: its bytes.
        takers: the regions that take it (indices into the chain, ascending).
        saved_by: those whose stored backward saves it.
        held_outside: something outside the regions keeps it through the backward.
        made_by: the region whose output it is (T5's first block makes the position bias
            the others take), counted there in its forward and here after it; ``-1``:
            made outside the regions, counted through the whole forward.
        freed_before_peak: how much lower than with it held the backward of its first
            saver peaks, stored, when it frees it (at most ``nbytes``; measured in the
            step, where that backward frees it and the other shared inputs it is first to
            save, whose figures add up to how much lower it peaks without them all:
            ``memory_model.shared_freed`` counts them only when a plan lets it free all).
    """

    nbytes: int
    takers: tuple[int, ...]
    saved_by: tuple[int, ...] = ()
    held_outside: bool = False
    made_by: int = -1
    freed_before_peak: int = 0

    def __post_init__(self) -> None:
        check_bytes("SharedInput", "nbytes", self.nbytes)
        check_bytes("SharedInput", "freed_before_peak", self.freed_before_peak)
        if self.freed_before_peak > self.nbytes:
            raise ValueError(
                f"SharedInput: freed_before_peak ({self.freed_before_peak}) is part of its "
                f"bytes (nbytes={self.nbytes}), so at most nbytes"
            )
        if self.freed_before_peak and (not self.saved_by or self.held_outside):
            raise ValueError(
                f"SharedInput: freed_before_peak ({self.freed_before_peak}) needs a region "
                f"that saves it (saved_by={self.saved_by!r}) and nothing outside holding it "
                f"(held_outside={self.held_outside!r})"
            )
        object.__setattr__(self, "takers", tuple(self.takers))
        object.__setattr__(self, "saved_by", tuple(self.saved_by))
        if not all(_is_index(i) for i in self.takers) or list(self.takers) != sorted(
            set(self.takers)
        ):
            raise ValueError(
                f"SharedInput: takers must be distinct region indices in ascending order, "
                f"got {self.takers!r}"
            )
        if not set(self.saved_by) <= set(self.takers):
            raise ValueError(
                f"SharedInput: saved_by {self.saved_by!r} must be among its takers {self.takers!r}"
            )
        if isinstance(self.made_by, bool) or not isinstance(self.made_by, int):
            raise ValueError(f"SharedInput: made_by must be an int, got {self.made_by!r}")
        if self.takers and not -1 <= self.made_by < self.takers[0]:
            raise ValueError(
                f"SharedInput: made_by {self.made_by} must be -1 or a region before its "
                f"takers {self.takers!r}"
            )
        if not isinstance(self.held_outside, bool):
            raise ValueError(f"SharedInput: held_outside must be a bool, got {self.held_outside!r}")


def _is_index(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0
