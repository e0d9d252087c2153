"""The package's shape, read from the source: its concerns as packages, stacked so imports point one
way; every module named here with its package (a new one must be placed); no import circle among
modules or among packages; none between tests/ and bench/; no file too long (the package's, bench's,
tests' or testkit's), no function taking too many arguments; the architecture page names every module."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "orchestrator"
BENCH = ROOT / "bench"
TESTS = ROOT / "tests"
TESTKIT = ROOT / "testkit"

# Top to bottom: a package may import from itself or a lower one, never a higher one. "" is the
# package's top level: the core every package may use.
PACKAGES = ["ops", "http", "request", "backends", "kv", "engines", ""]
MODULES = {
    "ops": {"cli", "supervise", "status", "status_format", "events", "grafana", "claude_env"},
    "http": {"app", "handlers", "listener", "access", "bodies", "schema_limits", "page", "history"},
    "request": {"exchange", "forward", "background", "placement", "parking", "relay", "release", "accounting",
                "routing", "synthetic", "client_stream", "schemas"},
    "backends": {"gateway", "health", "pool", "counting", "identity", "inflight"},
    "kv": {"store", "backend_saves", "folder", "server_id", "cachemiss", "parking", "results", "restorable"},
    "engines": {"upstream", "base", "llama_server", "model_cache", "vllm", "sglang", "choice", "supervisord",
                "local_process", "rpc_workers", "fingerprint"},
    "": {"config", "configfile", "errors", "metrics", "sse", "jsonvalues", "conversation", "splice", "slots"},
}
# Inside `request`, one request's way runs down too: forward never imported by what it calls.
REQUEST_LAYERS = [
    {"forward", "background"},
    {"exchange", "placement", "parking", "relay", "release", "accounting"},
    {"routing", "synthetic", "client_stream", "schemas"},
]
MAX_TOP_LEVEL = 10
MAX_LINES = 420
MAX_PARAMETERS = 6


def _modules() -> dict[str, Path]:
    """Dotted name (within orchestrator) -> file, for every module but the packages' __init__."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name != "__init__":
            found[".".join(rel.parts)] = path
    return found


def _resolve(module: str, node: ast.ImportFrom, known: set[str]) -> set[str]:
    """The package modules an import names, `module` being the importer's dotted name."""
    if node.level == 0:
        if not node.module or not node.module.startswith("orchestrator"):
            return set()
        base = node.module.split(".")[1:]
    else:
        here = module.split(".")[:-1]
        up = node.level - 1
        base = here[: len(here) - up] if up else here
        base = base + (node.module.split(".") if node.module else [])
    dotted = ".".join(base)
    if dotted in known:
        return {dotted}
    # `from . import a, b` or `from ..pkg import a`: the names are modules.
    return {n for a in node.names if (n := ".".join([*base, a.name])) in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                deps |= _resolve(name, node, known)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("orchestrator.") for a in node.names} & known
        graph[name] = deps - {name}
    return graph


def _package(module: str) -> str:
    return module.rpartition(".")[0]


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


def _flat_graph(folder: Path) -> dict[str, set[str]]:
    """Plain imports among one folder's scripts (bench/, tests/)."""
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for p in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
        graph[p.stem] = (deps & names) - {p.stem}
    return graph


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_placed_and_the_top_level_is_small():
    placed = {f"{p}.{m}" if p else m for p, mods in MODULES.items() for m in mods}
    assert set(_modules()) == placed, "a module is not in MODULES (or MODULES names one that is gone)"
    top = [p for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == \
        {p for p in PACKAGES if p}


def test_no_import_circle_among_modules_or_packages():
    graph = _graph()
    assert _cycle(graph) is None
    packages: dict[str, set[str]] = {}
    for a, deps in graph.items():
        packages.setdefault(_package(a), set()).update(_package(b) for b in deps if _package(b) != _package(a))
    assert _cycle(packages) is None


def test_packages_import_only_downward():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    upward = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
              if rank[_package(b)] < rank[_package(a)]]
    assert upward == []


def test_one_request_path_runs_down_and_does_not_depend_on_another():
    rank = {m: i for i, mods in enumerate(REQUEST_LAYERS) for m in mods}
    assert set(rank) == MODULES["request"]
    graph = _graph()
    upward = [f"{a} -> {b}" for a, deps in graph.items() if a.startswith("request.")
              for b in deps if b.startswith("request.") and rank[b.split(".")[1]] < rank[a.split(".")[1]]]
    assert upward == []
    assert "request.forward" not in graph["request.background"]


def test_tests_and_bench_share_code_only_through_an_importable_module():
    bench, tests = {p.stem for p in BENCH.glob("*.py")}, {p.stem for p in TESTS.rglob("*.py")}
    assert _cycle(_flat_graph(BENCH)) is None
    crossing = []
    for folder, other in ((BENCH, tests), (TESTS, bench)):
        for p in folder.rglob("*.py"):
            if p == Path(__file__):
                continue
            text = p.read_text()
            if "sys.path" in text:
                crossing.append(f"{p.relative_to(ROOT)}: edits sys.path")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] in other - {"conftest"}:
                    crossing.append(f"{p.relative_to(ROOT)}: imports {node.module}")
    assert crossing == []


def _long_files() -> dict[str, int]:
    files = [*PACKAGE.rglob("*.py"), *BENCH.glob("*.py"), *TESTS.rglob("*.py"), *TESTKIT.rglob("*.py")]
    return {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}


def test_no_module_bench_test_or_testkit_file_over_420_lines():
    """The package's modules, bench/, tests/ (test files and conftest alike) and testkit/: none over 420 lines."""
    assert _long_files() == {}


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def _click_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("command" in ast.unparse(d) or "option" in ast.unparse(d) for d in fn.decorator_list)


def test_no_function_takes_more_than_six_parameters():
    many = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _click_command(node) \
                    and _parameters(node) > MAX_PARAMETERS:
                many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_parameters(node)})")
    assert many == []


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = [m for m in _modules() if f"`{m.replace('.', '/')}`" not in page]
    assert unnamed == []


def test_no_two_test_files_share_a_name():
    """pytest imports test files by their basename (no packages under tests/): two of one name in two
    folders stop the whole suite at collection ("import file mismatch")."""
    names = collections.Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
