"""Where the project lives, so relative paths mean the same from `kedro run`, a notebook or a test."""

from __future__ import annotations

import os
from pathlib import Path

_USED: dict[str, Path | None] = {"root": None}  # this process's project root, once an entry point says it


def use_project_root(path: str | os.PathLike | None) -> None:
    """Resolve relative parameters against `path` in this process, whatever the current directory: called by
    the entry points that know the root (the Kedro hook: the session's project_path; a rank: its launch
    spec's). None: search again (tests)."""
    _USED["root"] = Path(path).resolve() if path is not None else None


def find_project_root(start: Path | None = None) -> Path:
    """The root an entry point set (use_project_root), else the nearest folder at or above `start` (default:
    cwd) whose pyproject.toml declares `[tool.kedro]`."""
    if start is None and _USED["root"] is not None:
        return _USED["root"]
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
