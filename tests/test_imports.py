"""The package's import graph: no cycles, and imports run one way, down the data flow.

The graph is read from the source (every `import` and `from ... import`, at module level or inside
a function: a lazy import is still a dependency; only imports under `if TYPE_CHECKING:`, which never
run, are left out), for `llmquant` and the folders installed as `llmquant.kernels` and `llmquant.evals`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llmquant": ROOT / "llmquant", "llmquant.kernels": ROOT / "kernels", "llmquant.evals": ROOT / "evals"}

# Layers from the bottom up: a module may import its own layer and those below it, never one above.
# Quantizers work on tensors and sit below the modules that hold their results (QuantLinear packs with
# methods.codes); transforms (awq, rotation, gptaq's float target) work on a model's blocks and sit
# above them. A longer prefix wins: llmquant.methods.presets is below llmquant.nn, llmquant.methods.awq above.
QUANTIZERS = ("codes", "grid", "rtn", "clip", "gptq", "presets")
LAYERS = [
    ("llmquant.errors", "llmquant.progress", "llmquant.hub"),
    ("llmquant.kernels",),
    tuple(f"llmquant.methods.{name}" for name in QUANTIZERS) + ("llmquant.methods",),
    ("llmquant.config",),
    ("llmquant.nn",),
    ("llmquant.methods.transform", "llmquant.methods.blocks", "llmquant.methods.awq", "llmquant.methods.rotation"),
    ("llmquant.methods.gptaq", "llmquant.methods.compose"),
    ("llmquant.calibration",),
    ("llmquant.formats", "llmquant.checkpoint"),
    ("llmquant.api", "llmquant.hf", "llmquant.stats"),
    ("llmquant.cli", "llmquant.evals", "llmquant"),
]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if "results" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the llmquant modules it imports (a package's name stands for its __init__)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from package import module` depends on that module; `from module import name` on module
                targets = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
                targets = targets or [source]
            else:
                continue
            for target in targets:
                while target and target not in known:  # `import llmquant.nn.linear` -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def test_the_graph_is_read():
    """The reader sees real edges (a graph without edges would pass every check below)."""
    graph = import_graph()
    assert "llmquant.kernels.layout" in graph["llmquant.kernels.dispatch"]
    assert "llmquant.nn.linear" in graph["llmquant.nn.surgery"]
    assert len(graph) > 60


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_run_down_the_data_flow():
    """No module imports one of a higher layer (LAYERS: kernels and methods at the bottom, the
    commands at the top). `from llmquant import __version__` is not an import up the flow: the root
    package has always run before any of its modules."""
    graph = import_graph()
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module) and target != "llmquant"
    ]
    assert not upward, "imports up the flow:\n" + "\n".join(upward)


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
