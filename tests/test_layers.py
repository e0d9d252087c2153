"""The package's shape: imports point one way (no circles), the request path's layers in order, and
no module much over 400 lines. Read from the source, so a change that breaks the shape fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "orchestrator"
BENCH = ROOT / "bench"

# Top to bottom: a module may import from its own layer or a lower one, never a higher one.
LAYERS = [
    {"cli"},
    {"app"},
    {"handlers"},
    {"proxy", "background"},
    {"placement", "parking", "relay", "release", "accounting"},
    {"gateway"},
    {"health", "kvsave", "affinity", "cachemiss", "counting", "slots", "upstream", "metrics", "prefixes"},
    {"config", "errors", "sse"},
]
MAX_LINES = 420  # "about 400"


def _imports(path: Path, siblings: set[str], package: str | None) -> set[str]:
    """The sibling modules `path` imports (relative imports inside a package, plain ones in bench/)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if package and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 0 and node.module:
                head = node.module.split(".")
                if package and head[0] == package and len(head) > 1:
                    found.add(head[1])
                elif not package:
                    found.add(head[0])
        elif isinstance(node, ast.Import) and not package:
            found.update(a.name.split(".")[0] for a in node.names)
    return found & siblings


def _graph(folder: Path, package: str | None) -> dict[str, set[str]]:
    names = {p.stem for p in folder.glob("*.py")}
    return {p.stem: _imports(p, names, package) - {p.stem} for p in folder.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_in_the_package_or_the_benchmarks():
    assert _cycle(_graph(PACKAGE, "orchestrator")) is None
    assert _cycle(_graph(BENCH, None)) is None


def test_imports_point_down_the_request_path_layers():
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    graph = _graph(PACKAGE, "orchestrator")
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
              if a in layer and b in layer and layer[b] < layer[a]]
    assert upward == []
    assert all(m in graph for m in layer), "a layer names a module that does not exist"


def test_one_request_path_does_not_depend_on_another():
    assert "proxy" not in _graph(PACKAGE, "orchestrator")["background"]


def test_no_module_much_over_400_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
