"""The package's import graph: no cycles, and every import respects the layering.

Ground floor (batch contract, config schema, losses, masking, errors, checkpoint files)
under Data and Models side by side (neither imports the other), Methods over Models,
``loading`` (files to modules) and ``official`` (the published weights) over both, Train and Eval/Analysis above, the CLI on top;
nothing below the CLI imports it. Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import codemae

PACKAGE = Path(codemae.__file__).parent
GROUND = {"batch", "config", "losses", "masking", "errors", "checkpoint"}
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "ground": {"ground"},
    "data": {"ground"},
    "models": {"ground"},
    "methods": {"ground", "models"},
    "loading": {"ground", "data", "models", "methods"},
    "official": {"ground", "models", "methods", "loading"},
    "train": {"ground", "data", "models", "methods", "loading", "official"},
    "eval": {"ground", "data", "models", "methods", "loading", "train", "export"},
    "analysis": {"ground", "data", "models", "methods", "loading", "eval"},
    "export": {"ground", "data", "models", "methods", "loading"},  # data: the run's statistics and band names
    "bench": {"ground", "data", "methods", "train", "config"},
    "bench_official": {"ground", "methods", "train"},  # codemae bench --against-official
    "cli": {"ground", "data", "models", "methods", "loading", "official", "train", "eval", "analysis", "export",
            "bench", "bench_official"},
    "top": {"export", "methods"},  # codemae/__init__: the version and the public load_encoder
}
ANYONE = {"top"}  # the package root: anything may read codemae.__version__


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if head in GROUND:
        return "ground"
    return "cli" if head == "__main__" else head


def imports() -> dict[str, set[str]]:
    """Every codemae module and the codemae modules it imports (``from codemae.x import y``
    counts ``codemae.x.y`` when that is a module, else ``codemae.x``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("codemae")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codemae"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_respect_the_layers():
    broken = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in imports().items() for target in sorted(targets)
        if layer_of(target) != layer_of(module) and layer_of(target) not in ALLOWED[layer_of(module)] | ANYONE
    ]
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_the_checker_sees_a_broken_layer_and_a_cycle(monkeypatch):
    """The rules above can fail: a Data module importing a Model, and a two-module cycle, are caught."""
    graph = imports()
    graph["codemae.data.sources"] = graph["codemae.data.sources"] | {"codemae.models.backbone"}
    graph["codemae.models.backbone"] = graph["codemae.models.backbone"] | {"codemae.data.sources"}
    monkeypatch.setattr(__import__(__name__), "imports", lambda: graph)
    for check in (test_imports_respect_the_layers, test_no_import_cycles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted fault")
