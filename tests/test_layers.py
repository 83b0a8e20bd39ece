"""The import-layer contract: the arrows between specdsl's packages point one way.

Every import counts, function-local ones included (they run too, and they are where cycles hide).
The rules, from the pipeline's shape (../shared/DESIGN.md):

* the core (frontend, ir, lower, passes, execute) and the plugin machinery (contract, plugins) never
  import what plugins provide (ops, probes, sources, backends, training, executors, designs,
  modelcache), nor the views or the entry points: the core names no op and no backend;
* the plugin side never imports the entry points (api, cli, builtin) or the views;
* only the entry points import the views; the compiler's stages never import a later stage;
* there is no import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "specdsl"

CORE = {"frontend", "ir", "lower", "passes", "execute", "contract", "plugins", "errors", "secrets", "secret_shapes", "templates",
        "hookspecs", "tables"}
PLUGIN_SIDE = {"ops", "probes", "sources", "backends", "training", "executors", "designs", "modelcache", "recipes"}
ENTRY = {"api", "cli", "__main__", "builtin"}
VIEWS = {"views"}
# Within the core, a stage imports only earlier ones (and the shared leaves).
STAGE_ORDER = ["secret_shapes", "errors", "secrets", "templates", "tables", "contract", "hookspecs", "plugins", "frontend", "ir",
               "lower", "passes", "execute"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the specdsl modules it imports (every import statement, wherever it stands)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for cand in candidates:
                if cand in modules:
                    found.add(cand)
                    break
        graph[name] = found - {name}
    return graph


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_the_core_never_imports_the_plugin_side_views_or_entry_points():
    bad = [f"{m} -> {t}" for m, targets in _imports().items() if _top(m) in CORE
           for t in targets if _top(t) in PLUGIN_SIDE | VIEWS | ENTRY]
    assert not bad, "the core reaches into plugins or views:\n" + "\n".join(sorted(bad))


def test_plugins_never_import_entry_points_or_views():
    bad = [f"{m} -> {t}" for m, targets in _imports().items() if _top(m) in PLUGIN_SIDE
           for t in targets if _top(t) in ENTRY | VIEWS]
    assert not bad, "\n".join(sorted(bad))


def test_core_stages_import_only_earlier_stages():
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    bad = [f"{m} -> {t}" for m, targets in _imports().items() if _top(m) in rank
           for t in targets if _top(t) in rank and rank[_top(t)] > rank[_top(m)]]
    assert not bad, "an earlier stage imports a later one:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_contract_test_sees_function_local_imports():
    """The scan must count an import inside a function: a blind scan would pass anything."""
    graph = _imports()
    assert "specdsl.modelcache.models" in graph["specdsl.backends.transformers.backend"]  # inside model_dir()
