"""The package's layout keeps its architecture (ARCHITECTURE.md): stage folders, imports
that flow one way, no cycle, no module over 500 lines, no module shadowed by a function."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "remat"
# Lower stages never import higher ones: cli -> bench -> planner (and integrations) ->
# policy -> engine -> measure -> errors.
STAGES = {
    "errors": 0,
    "measure": 1,
    "engine": 2,
    "policy": 3,
    "planner": 4,
    "integrations": 4,
    "bench": 5,
    "cli": 6,
    "__main__": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """remat modules ``name`` imports when it is imported (module level, not TYPE_CHECKING)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for target in targets:
            # importing remat.a.b imports its packages remat and remat.a first; this
            # module's own packages are being imported already
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in MODULES and candidate != name and candidate not in ancestors:
                    found.add(candidate)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _stage(name: str) -> int | None:
    parts = name.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 else None


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if state.get(name) is None:
            visit(name, [name])


def test_imports_flow_one_way_down_the_stages():
    wrong = []
    for name, targets in GRAPH.items():
        own = _stage(name)
        if own is None:  # the package's __init__ re-exports every stage
            continue
        for target in targets:
            stage = _stage(target)
            if stage is not None and stage > own:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports up the stages: " + ", ".join(sorted(wrong))


def test_no_module_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: k for n, k in long.items() if k > 500}


def test_every_module_imports_as_a_module_not_a_function():
    for name in MODULES:
        assert isinstance(importlib.import_module(name), types.ModuleType), name
        parent, _, child = name.rpartition(".")
        if parent:  # remat.profile is a function; no module may hide behind one
            attribute = getattr(importlib.import_module(parent), child, None)
            assert attribute is None or isinstance(attribute, types.ModuleType), name
