"""Where the project lives, so relative paths mean the same from `kedro run`, a notebook or a test."""

from __future__ import annotations

import os
from pathlib import Path


def find_project_root(start: Path | None = None) -> Path:
    """Nearest folder at or above `start` (default: cwd) whose pyproject.toml declares `[tool.kedro]`.

    FOOD_MULTIDS_PROJECT_ROOT overrides the search (used by training subprocesses).
    """
    env = os.environ.get("FOOD_MULTIDS_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text(encoding="utf-8"):
            return folder
    return here


def resolve_path(path: str | os.PathLike, root: Path | None = None) -> Path:
    """Absolute path: `~` expanded, relative paths taken from the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or find_project_root()) / p
