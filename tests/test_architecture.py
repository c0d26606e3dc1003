"""The package's shape: imports point one way through its layers, with no cycle and no import hidden inside a
function, and no module grows past a size a reader takes in at once. Read from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgclf_jax"

# Lower layers never import higher ones: sources -> pipeline -> model/ops -> training -> evaluation -> the
# entry point that composes them. Within a layer, any order without a cycle.
LAYERS = [
    ("base", {"__init__", "errors", "user_cache", "xla_cpu", "cli", "parallel", "metrics", "plotting", "image_io",
              "fingerprints", "demo_data", "config_lib", "recipes"}),
    ("data", {"file_checks", "folders", "input_pipeline"}),
    ("model", {"pooling", "cpu_conv", "conv", "models", "augmentation", "mixing", "losses"}),
    ("training", {"train_state", "schedule", "steps", "time_budget", "checkpointing", "workdir", "trainer"}),
    ("evaluation", {"inference", "evaluate", "predict", "report", "doctor", "export"}),
    ("entry", {"train"}),
]
MAX_LINES = 420


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in PACKAGE.glob("*.py")}


def _imported(node: ast.AST) -> set[str]:
    """The imgclf_jax modules an import statement names."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("imgclf_jax.")}
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "imgclf_jax":
            return {a.name for a in node.names}
        if node.module.startswith("imgclf_jax."):
            return {node.module.split(".")[1]}
    return set()


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in _modules().items():
        found = set()
        for node in tree.body:
            if _is_main_guard(node):  # An entry point's set-up before its imports: not a dependency.
                continue
            for inner in ast.walk(node):
                found |= _imported(inner)
        graph[name] = found - {"__version__"} | ({"__init__"} if "__version__" in found else set())
    return graph


def test_every_module_has_a_layer():
    layered = set().union(*(members for _, members in LAYERS))
    assert set(_modules()) == layered


def test_imports_point_one_way_through_the_layers():
    rank = {module: i for i, (_, members) in enumerate(LAYERS) for module in members}
    upward = [f"{module} ({LAYERS[rank[module]][0]}) imports {target} ({LAYERS[rank[target]][0]})"
              for module, targets in _graph().items() for target in targets if rank[target] > rank[module]]
    assert upward == []


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_package_import_inside_a_function():
    hidden = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{name}.{node.name} imports {target}" for inner in ast.walk(node)
                           for target in _imported(inner)]
    assert hidden == []


def test_modules_stay_small():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
