"""What a checkpointed callable touches: the modules it visibly uses (whose buffers are
replayed and whose parameters are checked), the tensors in its closure, and its name for
error messages (a module's qualified name where known).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

# Qualified names of modules, filled in by whoever knows the root model (remat.apply), so
# that errors can say "blocks.3" rather than "Block".
__all__ = [
    "closure_tensors",
    "describe_fn",
    "owner_module",
    "reachable_modules",
    "register_module_names",
]


_MODULE_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def register_module_names(root: nn.Module) -> None:
    """Remember the qualified name of every submodule of ``root`` for error messages."""
    for name, module in root.named_modules():
        _MODULE_NAMES[module] = name or type(root).__name__


def owner_module(fn: Any) -> nn.Module | None:
    """The module whose forward ``fn`` runs: the module itself, a bound method's owner, or
    the module of ``functools.partial(type(m).forward, m)`` (what ``remat.apply`` passes)."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    if isinstance(fn, functools.partial) and fn.args and isinstance(fn.args[0], nn.Module):
        return fn.args[0]
    return None


def describe_fn(fn: Any) -> str:
    """A human name for a checkpointed callable: its module's qualified name where known."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        name = _MODULE_NAMES.get(owner)
        kind = type(owner).__name__
        method = "" if owner is fn else f".{getattr(fn, '__name__', 'forward')}"
        return f"module '{name}' ({kind}{method})" if name else f"module {kind}{method}"
    if isinstance(fn, functools.partial):
        if fn.args and isinstance(fn.args[0], nn.Module):  # partial(type(m).forward, m)
            return describe_fn(fn.args[0])
        return f"partial({describe_fn(fn.func)})"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"function {getattr(fn, '__module__', None) or '?'}.{qualname}"


def reachable_modules(fn: Any, args: Sequence[Any]) -> list[nn.Module]:
    """Modules a checkpointed callable visibly uses.

    Looks at ``fn`` itself, the module a bound method belongs to, the parts of a
    ``functools.partial``, modules captured in a closure, and modules passed as arguments.
    A module reached only through a global variable is invisible here; the function engine
    detects that case from the autograd graph and refuses it.
    """
    found: dict[int, nn.Module] = {}
    stack: list[Any] = [fn, *args]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found.setdefault(id(obj), obj)
            continue
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
            continue
        if isinstance(obj, functools.partial):
            stack.extend((obj.func, *obj.args, *obj.keywords.values()))
            continue
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, nn.Module):
            stack.append(owner)
        func = getattr(obj, "__func__", obj)
        for cell in getattr(func, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # empty cell
                contents = cell.cell_contents
                if isinstance(contents, (nn.Module, functools.partial)) or callable(contents):
                    stack.append(contents)
    return list(found.values())


def closure_tensors(fn: Any) -> list[Tensor]:
    """Tensors that require grad captured in ``fn``'s closure (a lambda over a weight)."""
    func = getattr(fn, "__func__", fn)
    out = []
    for cell in getattr(func, "__closure__", None) or ():
        with contextlib.suppress(ValueError):
            contents = cell.cell_contents
            if isinstance(contents, Tensor) and contents.requires_grad:
                out.append(contents)
    return out
