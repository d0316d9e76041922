"""The package's layers import downwards only: no import circles, even through function-level imports.

core ← workflows ← training / callbacks ← cli: the core and the workflows never reach up into the
Lightning layer (they would train a model or pull Lightning into a torch-only import).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"adasvd_lightning": ROOT / "adasvd_lightning", "adasvd_lightning.callbacks": ROOT / "callbacks"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    # The package's __init__ files only re-export; a module importing its own package is not a cycle.
    graph = {k: {d for d in v if not k.startswith(d + ".")} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_core_and_workflows_never_import_the_lightning_layer():
    graph = _graph()
    upper = ("adasvd_lightning.training", "adasvd_lightning.callbacks", "adasvd_lightning.cli",
             "adasvd_lightning.lightning_cli")
    for name, deps in graph.items():
        if name.startswith("adasvd_lightning.core") or name == "adasvd_lightning.workflows":
            assert not [d for d in deps if d.startswith(upper)], (name, deps)
    for name in ("adasvd_lightning.workflows", *[n for n in graph if n.startswith("adasvd_lightning.core")]):
        source = _modules()[name].read_text()
        assert "import lightning" not in source and "from lightning" not in source, name
