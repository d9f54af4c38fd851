"""The package's import graph, counting imports inside functions: no cycles, and imports point down
the layers of docs/architecture.md. `python tests/test_imports.py` prints the graph."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "instructdiff_ray"

# Lowest first; a module may import its own layer and the layers below (docs/architecture.md).
LAYERS = [
    ["config", "strategies", "records", "faults", "metrics", "stats", "version", "engines", "engines.registry"],  # declarations
    ["rundir"],  # everything persisted
    ["sources", "models", "console"],
    ["runtime", "progress", "readers", "readers.base", "readers.io", "readers.jsonl", "readers.tables",
     "readers.parquet", "readers.arrow"],
    ["corpus", "template", "engines.base", "engines.memory", "engines.hf", "engines.vllm", "engines.vllm_model"],
    ["export", "selection", "selection_search", "scoring", "warmup", "evaluate"],  # stages
    ["report", "tracking"],
    ["compare"],
    ["preflight", "pipeline"],  # the job
    ["api"],
    ["cli", "__main__", "__init__"],
]
MAX_UPWARD = 8


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def graph() -> dict[str, set[str]]:
    """module -> package modules it imports (relative imports anywhere in its source)."""
    mods = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if name == "__init__":
            package = ""
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            parts = package.split(".") if package else []
            parts = parts[: len(parts) - (node.level - 1)]
            target = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found = sub if sub in mods else (target or "__init__")
                if found in mods and found != name:
                    edges[name].add(found)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def layer_of() -> dict[str, int]:
    return {m: i for i, layer in enumerate(LAYERS) for m in layer}


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    layer = layer_of()
    return sorted((a, b) for a, bs in edges.items() for b in bs if layer[b] > layer[a])


def test_every_module_has_a_layer():
    assert set(modules()) == set(layer_of()), "add the new module to LAYERS (and docs/architecture.md)"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    up = upward(graph())
    assert len(up) <= MAX_UPWARD, up


def test_config_reads_only_the_leaf_registries():
    """config validates engine and strategy names from their registries, which import nothing."""
    edges = graph()
    assert edges["config"] == {"engines.registry", "strategies"}
    assert edges.get("engines.registry", set()) == set() and edges.get("strategies", set()) == set()


if __name__ == "__main__":
    g = graph()
    for name in sorted(modules(), key=lambda m: (layer_of()[m], m)):
        print(f"L{layer_of()[name]:<2} {name:<22} -> {', '.join(sorted(g.get(name, ()))) or '-'}")
    print(f"cycles: {cycles(g) or 'none'}; upward imports: {upward(g) or 'none'}")
