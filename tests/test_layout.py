"""The architecture rules that a folder listing cannot show: file size, import cycles, inheritance depth.

DESIGN.md §5/§8: one subpackage per family beside a shared core, no file over ~400 lines, no import cycles
between svdkit's modules (function-level imports included: a lazy import only hides a cycle), at most one
level of inheritance below a class svdkit defines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdkit"
MAX_LINES = 400
FAMILIES = ("core", "adapters", "compression", "merging", "optim", "inspection", "training", "benchmarking", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """svdkit modules that ``module`` imports anywhere in its body (the façade ``svdkit`` itself excluded)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in known else source)
    return {m for m in found if m in known and m != "svdkit" and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_source_file_is_within_the_line_budget():
    over = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines (split them by concept): {over}"


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_top_level_folders_are_the_families_and_the_shared_core():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(FAMILIES), f"unexpected subpackages: {folders - set(FAMILIES)}"
    assert {"core", "adapters", "training", "benchmarking", "cli"} <= folders
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], f"modules outside a family or the core: {loose}"


def _class_bases() -> dict[str, list[str]]:
    bases = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]
                bases[node.name] = names
    return bases


def test_no_inheritance_deeper_than_one_level_below_svdkit_classes():
    bases = _class_bases()
    deep = sorted(
        f"{cls}({parent}({grand}))"
        for cls, parents in bases.items()
        for parent in parents
        if parent in bases
        for grand in bases[parent]
        if grand in bases
    )
    assert not deep, f"inheritance deeper than one level among svdkit's classes: {deep}"


@pytest.mark.parametrize("name", ["svdkit.benchmarking.grid", "svdkit.adapters.zoo", "svdkit.core.linalg"])
def test_subpackages_are_not_shadowed_by_functions(name):
    import importlib

    import svdkit

    module = importlib.import_module(name)
    parent, leaf = name.rsplit(".", 1)
    assert getattr(importlib.import_module(parent), leaf) is module
    assert callable(svdkit.bench) and callable(svdkit.adapt)
