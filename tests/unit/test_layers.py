"""The layout is the architecture: one folder a layer, imports pointing down only.

Walks every module's imports (function-level ones included) with ``ast``, so a
cycle hidden inside a function counts as a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "psctl"

# Lower numbers sit lower. A module may import its own layer and any lower one,
# except that core/ and net/ are siblings that never import each other.
RANK = {
    "errors": 0,
    "protocol": 1,
    "core": 2,
    "net": 2,
    "data": 3,
    "models": 4,
    "files": 5,
    "cluster": 6,
    "apps": 7,
    "cli": 8,
    "sklearn": 8,  # scikit-learn estimators: a front end over apps/, like the CLI
    "spark": 8,  # psctl on Spark: a front end over apps/ (train, predict), like sklearn/; never cli/
}
PURE = ("protocol", "core")
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "uvloop", "subprocess", "threading"}
# cli/ only parses and renders: it reaches psctl through apps/ (and the error types).
CLI_MAY_IMPORT = {"apps", "cli", "errors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a import b`` names a.b when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from pkg import module` depends on that module; `from pkg import name` on pkg itself
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists() else node.module)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    loose = [m for m in MODULES if _layer(m) not in RANK and m not in ("psctl", "psctl.__main__")]
    assert not loose, f"modules outside the layers: {loose}"


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_do_no_io(layer):
    bad = {
        m: sorted(i for i in _imports(MODULES[m]) if i.split(".")[0] in IO_MODULES or _layer(i) == "net")
        for m in MODULES
        if _layer(m) == layer
    }
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"{layer}/ must stay pure: {bad}"


def test_imports_point_down():
    upward = []
    for module, deps in GRAPH.items():
        here = _layer(module)
        if here not in RANK:
            continue
        for dep in deps:
            there = _layer(dep)
            if there is None or there == here:
                continue
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here]):
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_cli_reaches_only_apps():
    below = [
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        if _layer(m) == "cli"
        for d in deps
        if _layer(d) not in CLI_MAY_IMPORT and d != "psctl"
    ]
    assert not below, "cli/ reaches below apps/:\n" + "\n".join(sorted(below))


def test_no_import_cycles():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
