"""No import cycles inside ``sdtune``: every import counts, the lazy ones inside functions too (a lazy import
hides a cycle from Python, not from the reader). A module another one needs sits below it and offers a public
function (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.module_imports import imported_names


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (REPO_ROOT / "sdtune").rglob("*.py")}
    return {
        name: {n for n in imported_names(path, REPO_ROOT) if n in files and n != name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_sdtune():
    graph = _graph()
    assert "sdtune.models.single_file" in graph["sdtune.models.loading"]  # the graph sees lazy imports
    assert _cycles(graph) == []
