"""The package's import graph, read with ``ast``: no cycles, and the inference layer never imports synth/.

Every ``import`` / ``from ... import`` of a package module counts, at module level and inside functions
(lazy imports run too, just later), except those under ``if TYPE_CHECKING:``, which never run. A
``from pkg.mod import name`` is an edge to ``pkg.mod.name`` when that is a module, else to ``pkg.mod``.
Parent packages are not added as implicit edges (``score/__init__`` re-exporting ``score.pipeline`` is not
a cycle with ``score.manifest``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import xbmd_batch

PKG = "xbmd_batch"
ROOT = Path(xbmd_batch.__file__).parent


def _module_names(root: Path) -> dict[str, Path]:
    names = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = f
    return names


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _longest_module(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.AST, module: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    """Package modules this module imports at run time (module level and inside functions)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(m for a in child.names if (m := _longest_module(a.name, mods)))
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = module.split(".")
                    base = base[: len(base) - child.level + (1 if is_pkg else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                for a in child.names:
                    if (m := _longest_module(f"{target}.{a.name}", mods)) is not None:
                        found.add(m)
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> package modules it imports."""
    mods = _module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = _imports(tree, name, path.name == "__init__.py", mods) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_graph_sees_lazy_imports() -> None:
    g = import_graph()
    # score/pipeline opens the runner inside a function: the walk must still see that edge
    assert any(e.startswith(f"{PKG}.infer") for e in g[f"{PKG}.score.pipeline"]), g[f"{PKG}.score.pipeline"]


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph()) == []


def test_inference_layer_never_imports_synth() -> None:
    g = import_graph()
    bad = {m: sorted(e for e in es if e.startswith(f"{PKG}.synth")) for m, es in g.items()}
    bad = {m: es for m, es in bad.items() if m.startswith(f"{PKG}.infer") and es}
    assert not bad
    assert f"{PKG}.infer.select" in g  # the rule is checked against the real layout


def test_cycle_finder_finds_a_planted_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c"]]
