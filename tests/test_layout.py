"""Dependencies run one way: a package never imports one above it (read from the source, every import,
including the ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "food_multids"

# A package may import helpers/ and config/ (the leaves) and the packages not listed against it; these
# are the ones above it or beside it.
SHELL = {"framework", "console", "pipelines"}  # Kedro/MLflow shell, the command, the node functions
NEVER_ABOVE = {
    "helpers": {"config", "runtime", "data", "model", "tracking", "training", "evaluation", "pipelines", "inference",
                "catalog", "report", *SHELL},
    "config": {"runtime", "data", "model", "tracking", "training", "evaluation", "pipelines", "inference",
               "catalog", "report", *SHELL},
    "catalog": {"training", "evaluation", "report", *SHELL},
    "report": {"training", "runtime", "inference", *SHELL},
    "runtime": {"data", "model", "tracking", "training", "evaluation", "pipelines", "inference"},
    "data": {"model", "tracking", "training", "evaluation", "pipelines", "runtime", "inference"},
    "model": {"tracking", "training", "evaluation", "pipelines", "runtime", "data", "inference"},
    "tracking": {"training", "evaluation", "pipelines", "runtime", "data", "model", "inference"},
    "inference": {"tracking", "training", "evaluation", "pipelines"},
    "training": {"evaluation", "pipelines", "inference"},
    "evaluation": {"training", "pipelines", "report", "framework", "console"},
}
# What the package root may hold: Kedro's project files, and re-exports at paths that registered MLflow
# models pickled (food_multids.serving.ServedClassifier) before issue 28 moved them.
ROOT_MODULES = {"__init__.py", "__main__.py", "settings.py", "pipeline_registry.py", "serving.py"}
REEXPORTS = {"serving.py", "datasets"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "food_multids" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_package_imports_one_above_it():
    wrong = []
    for package, forbidden in NEVER_ABOVE.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for target in imported_packages(path) & forbidden:
                wrong.append(f"{path.relative_to(PACKAGE)} imports food_multids.{target}")
    assert wrong == []


def test_the_rule_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from food_multids.training.loop import Trainer\n")
    assert imported_packages(module) == {"training"}


def test_the_root_holds_kedros_files_and_packages_only():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    print(f"root modules: {modules}; packages: {packages}")  # noqa: T201
    assert set(modules) <= ROOT_MODULES
    for name in REEXPORTS:  # a re-export only: nothing defined there
        for path in ([PACKAGE / name] if name.endswith(".py") else sorted((PACKAGE / name).glob("*.py"))):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            assert all(isinstance(n, ast.ImportFrom | ast.Expr) for n in tree.body), path


def test_the_helpers_import_nothing_of_the_project():
    for path in sorted((PACKAGE / "helpers").glob("*.py")):
        assert imported_packages(path) <= {"helpers"}, path.name


def module_graph(package: Path) -> dict[str, set[str]]:
    """Every module of `package` -> the project modules it imports (top-level and inside functions; `from
    food_multids.x import y` counts x.y when y is a module, else x)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in package.rglob("*.py")}

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(package.name):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_import_cycle_even_through_imports_inside_functions():
    graph = module_graph(PACKAGE)
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} project imports, "  # noqa: T201
          f"{len(import_cycles(graph))} cycles")
    assert import_cycles(graph) == []


def test_the_cycle_check_sees_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "food_multids"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model/__init__.py").write_text("")
    (package / "model/classifier.py").write_text("from food_multids.model.lora import ADAPTER_FILE\n")
    (package / "model/lora.py").write_text("def export():\n    from food_multids.model.classifier import X\n")
    (package / "model/export.py").write_text("from food_multids.model import lora\n")
    assert import_cycles(module_graph(package)) == [["food_multids.model.classifier", "food_multids.model.lora"]]
