"""No import cycles between the project's modules (``ctdbench``, ``methods``, ``analysis``).

Every import counts, also one inside a function: a deferred import hides a cycle from Python,
not from a reader. ``methods/__init__.py`` imports the method files by discovery, not by name,
so the registry is not an edge.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ctdbench", "methods", "analysis")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (root / pkg).glob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            deps |= {t for t in targets if t in files}
        # A module's package __init__ runs before it: that edge is Python's, not a design choice.
        graph[name] = deps - {name, name.rpartition(".")[0]}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_cycles():
    graph = import_graph()
    assert {"ctdbench.cli", "ctdbench.bench", "ctdbench.recipe", "methods.mined"} <= set(graph)
    assert "ctdbench.recipe" in graph["ctdbench.bench"] and "ctdbench.recipe" in graph["ctdbench.cli"]
    assert cycles(graph) == []


def test_cycles_finds_every_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}) == [["c", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
