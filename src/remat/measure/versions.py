"""Version counters: what autograd checks for saved tensors, and remat checks for the rest.

Autograd records a saved tensor's version counter and raises in backward when the tensor
was written in place since ("modified by an inplace operation"). It skips that check for
every tensor that goes through a ``saved_tensors_hooks`` pack hook, and a recomputation reads
tensors autograd never saved at all (a bias, a weight, a module's buffer). Both would use the
new values silently: a parameter an optimizer stepped between forward and backward (a GAN's
``optD.step()`` before ``loss.backward()``) gives a wrong gradient. The helpers here record
versions where remat takes a tensor over and check them where it gives the tensor back.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from remat.errors import CheckpointError

__all__ = ["ReadVersions", "Versioned", "checked_version", "modified_error"]


def modified_error(tensor: Tensor, saved: int, where: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"remat: {where}: {what} (shape {list(tensor.shape)}, {tensor.dtype}) was modified "
        f"by an in-place operation after the forward pass used it: it is at version "
        f"{tensor._version}, the forward saw version {saved}. Its backward would use the new "
        "values. Call backward before changing it (an optimizer step, a parameter update), "
        "or clone it before the in-place operation."
    )


def checked_version(tensor: Tensor, saved: int, where: str) -> Tensor:
    """``tensor``, after checking it is still at version ``saved``."""
    if tensor._version != saved:
        raise modified_error(tensor, saved, where, "a tensor saved for backward")
    return tensor


class Versioned:
    """What a pack hook hands autograd for a tensor it keeps as it is: the tensor (detached,
    so the graph holds no cycle through its ``grad_fn``) and its version, checked on unpack
    as autograd itself would without the hook."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor.detach() if tensor.requires_grad else tensor
        self.version = tensor._version

    def unpack(self, where: str) -> Tensor:
        return checked_version(self.tensor, self.version, where)


class ReadVersions:
    """Versions of the tensors a region reads from outside without saving them as inputs
    (its modules' parameters and buffers), recorded after its forward and checked when it
    recomputes: a recomputation with stepped weights would silently differ."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, int]] = []

    def record(self, tensors: Iterable[Tensor]) -> None:
        seen: set[int] = set()
        entries = []
        for t in tensors:
            if id(t) in seen or t.is_inference():
                continue
            seen.add(id(t))
            entries.append((t, t._version))
        self.entries = entries

    def check(self, where: str) -> None:
        for tensor, version in self.entries:
            if tensor._version != version:
                raise modified_error(tensor, version, where, "a parameter or buffer it reads")
