"""The package's layout keeps its architecture (ARCHITECTURE.md): stage folders, imports
that flow one way, no cycle, no module over 500 lines, no module shadowed by a function, no
torch in the solver, no stage folder over a quarter of the package."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "remat"
# Lower stages never import higher ones: cli -> bench -> integrations -> planner ->
# profiling -> targets -> solver -> policy -> engine -> measure -> errors.
STAGES = {
    "errors": 0,
    "measure": 1,
    "engine": 2,
    "policy": 3,
    "solver": 4,
    "targets": 5,
    "profiling": 6,
    "planner": 7,
    "integrations": 8,
    "bench": 9,
    "cli": 10,
    "__main__": 10,
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


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the packages other than remat that ``path`` imports (any line)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"remat", "__future__"}


def test_the_solver_imports_no_torch_directly_or_through_remat():
    solver = {n for n in MODULES if n == "remat.solver" or n.startswith("remat.solver.")}
    reached, todo = set(), list(solver)
    while todo:  # every remat module a solver module imports, however indirectly
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(GRAPH[name] - {"remat"})
    torch_users = {n for n in reached if "torch" in _third_party_imports(MODULES[n])}
    assert not torch_users, f"the solver reaches torch through {sorted(torch_users)}"


def test_no_stage_folder_holds_over_a_quarter_of_the_package():
    lines: dict[str, int] = {}
    for name, path in MODULES.items():
        parts = name.split(".")
        folder = len(parts) > 2 or (len(parts) == 2 and path.name == "__init__.py")
        stage = parts[1] if folder else "<top>"
        lines[stage] = lines.get(stage, 0) + len(path.read_text().splitlines())
    total = sum(lines.values())
    big = {s: f"{n / total:.0%}" for s, n in lines.items() if s != "<top>" and n > total / 4}
    assert not big, f"stage folders over a quarter of the package's lines: {big}"


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, its docstring aside."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_over_80_lines():
    long = {
        f"{name}.{node.name}": _code_lines(node)
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 80
    }
    assert not long, f"functions over 80 lines (docstring aside): {long}"
