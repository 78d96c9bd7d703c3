"""Dependencies run one way: a package never imports one above it (read from the source, every import,
including the ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "food_multids"

# A package may import the top-level helper modules (config, paths, interrupts, progress, metrics) and
# the packages not listed against it; these are the ones above it or beside it.
NEVER_ABOVE = {
    "runtime": {"data", "model", "tracking", "training", "evaluation", "pipelines", "inference"},
    "data": {"model", "tracking", "training", "evaluation", "pipelines", "runtime", "inference"},
    "model": {"tracking", "training", "evaluation", "pipelines", "runtime", "data", "inference"},
    "tracking": {"training", "evaluation", "pipelines", "runtime", "data", "model", "inference"},
    "inference": {"tracking", "training", "evaluation", "pipelines"},
    "training": {"evaluation", "pipelines", "inference"},
    "evaluation": {"training", "pipelines"},
}


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


def test_the_top_level_helpers_import_no_package():
    helpers = {"config", "paths", "interrupts", "progress", "metrics"}
    for name in sorted(helpers):
        assert imported_packages(PACKAGE / f"{name}.py") <= helpers, name
