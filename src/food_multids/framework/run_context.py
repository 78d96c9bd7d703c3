"""What a node may need to know about the `kedro run` it is part of, set once by the project's hook before
the first node (Kedro gives nodes their inputs only: the run environment is not one of them)."""

from __future__ import annotations

_RUN: dict[str, str | None] = {"env": None}


def set_run_env(env: str) -> None:
    _RUN["env"] = env


def run_env() -> str | None:
    """The Kedro environment of the running pipeline (None outside `kedro run`, e.g. a node called in a test)."""
    return _RUN["env"]
