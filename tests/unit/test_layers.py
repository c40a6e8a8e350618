"""The package layout is the architecture (docs/design.md, "Module map"):
imports point down the layers, never up or sideways, and no module takes
part in an import cycle. Every import counts, also one inside a function or
under `if TYPE_CHECKING:`: each is a dependency a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "failoverd"

# layer -> the layers its modules may import (its own included). The top-level
# modules are layers of their own: the composition root and the entry points.
# Every layer may read the package's version (failoverd/__init__.py holds nothing else).
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "config": {"config", "core", "__init__"},
    "adapters": {"adapters", "config", "core", "__init__"},
    "runtime": {"runtime", "config", "core", "__init__"},
    "api": {"api", "runtime", "config", "core", "__init__"},
    "ctl": {"ctl", "api", "config", "core", "__init__"},
    "sim": {"sim", "runtime", "config", "core", "__init__"},
    "daemon": {"daemon", "adapters", "api", "runtime", "config", "core", "__init__"},
    "cli": {"cli", "daemon", "sim", "config", "core", "__init__"},
    "__init__": {"__init__"},
    "__main__": {"__main__", "cli"},
}
# What the protocol core may import from the standard library: nothing that
# does I/O, keeps time, draws randomness or runs an event loop.
CORE_STDLIB = {"__future__", "collections", "collections.abc", "dataclasses", "enum", "json", "math", "typing"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, as dotted names (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = modules()
GRAPH = {m: {i for i in imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = layer(module)
    assert mine in ALLOWED, f"{module}: layer {mine!r} is not in the module map"
    wrong = sorted(i for i in GRAPH[module] if layer(i) not in ALLOWED[mine])
    assert not wrong, f"{module} (layer {mine}) must not import {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "core"))
def test_the_core_imports_no_io_no_clock_no_randomness(module):
    outside = {i for i in imports(module, MODULES[module]) if not i.startswith("failoverd")}
    top = {i for i in outside if i.split(".")[0] in {"asyncio", "time", "random", "os", "socket", "threading"}}
    assert not top, f"{module} imports {sorted(top)}"
    unexpected = {i for i in outside if i not in CORE_STDLIB and i.rpartition(".")[0] not in CORE_STDLIB}
    assert not unexpected, f"{module} imports {sorted(unexpected)}; the core's allowance is {sorted(CORE_STDLIB)}"


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_check_can_fail():
    """The rules above are not vacuous: they see the imports that exist."""
    assert "failoverd.core.node" in GRAPH["failoverd.runtime.supervisor"]
    assert "failoverd.runtime.supervisor" in GRAPH["failoverd.sim.world"]
    assert layer("failoverd.adapters.postgres.adapter") == "adapters"
    assert "runtime" not in ALLOWED["adapters"] and "adapters" not in ALLOWED["runtime"]
