"""Project hooks: the project root for relative paths, a readable MLflow store, and signals as clean stops."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

from kedro.framework.hooks import hook_impl

from food_multids.interrupts import RunInterrupted, raise_on_signals

logger = logging.getLogger(__name__)


class MlflowStoreError(RuntimeError):
    """The sqlite file behind the MLflow tracking URI cannot be read."""


def check_sqlite_store(path: Path) -> None:
    """Fail early, naming the file and the way out, when the MLflow sqlite store is truncated or damaged.

    Reads the header's page count against the file size (a truncated copy is the common case) and the
    schema table; sqlite itself only says 'database disk image is malformed', without the file.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return  # MLflow creates it
    if any(path.with_name(path.name + suffix).exists() for suffix in ("-journal", "-wal")):
        return  # an interrupted write sqlite rolls back on the next open: not damage
    fix = (f"move it aside (mv {path} {path}.damaged) so that MLflow starts a new store, or restore it from a "
           "backup; `sqlite3 FILE .recover` can salvage what is readable")
    with path.open("rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise MlflowStoreError(f"the MLflow store {path} is not an sqlite database: {fix}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and path.stat().st_size < pages * page_size:
        raise MlflowStoreError(f"the MLflow store {path} is truncated ({path.stat().st_size} bytes, its header "
                               f"says {pages * page_size}): {fix}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError as exc:
        raise MlflowStoreError(f"the MLflow store {path} cannot be read ({exc}): {fix}") from exc


def _sqlite_path(uri: str | None) -> Path | None:
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


class ProjectHooks:
    def __init__(self) -> None:
        self._signals: contextlib.ExitStack | None = None
        self._run_id: str | None = None

    @hook_impl(tryfirst=True)  # before kedro-mlflow opens the store
    def after_context_created(self, context) -> None:
        # Nodes, training subprocesses and notebooks resolve relative parameters against this folder,
        # whatever the current directory is.
        os.environ["FOOD_MULTIDS_PROJECT_ROOT"] = str(context.project_path)
        try:
            uri = context.config_loader["mlflow"].get("server", {}).get("mlflow_tracking_uri")
        except Exception:  # no mlflow.yml in this environment: kedro-mlflow reports that itself
            return
        path = _sqlite_path(uri)
        if path is not None:
            check_sqlite_store(path)

    @hook_impl(trylast=True)  # after kedro-mlflow has started the run
    def before_pipeline_run(self) -> None:
        import mlflow

        run = mlflow.active_run()
        self._run_id = run.info.run_id if run else None
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(raise_on_signals())

    @hook_impl(tryfirst=True)  # before other hooks can raise past it
    def after_pipeline_run(self) -> None:
        self._restore_signals()

    @hook_impl(trylast=True)  # after kedro-mlflow has ended the run as FAILED
    def on_pipeline_error(self, error: Exception) -> None:
        self._restore_signals()
        if isinstance(error, RunInterrupted) and self._run_id:
            import mlflow
            from mlflow.tracking import MlflowClient

            # A run stopped on purpose (Ctrl-C, a cluster's pre-emption) is KILLED, not FAILED or FINISHED.
            MlflowClient(mlflow.get_tracking_uri()).set_terminated(self._run_id, "KILLED")
            logger.warning("MLflow run %s marked KILLED: %s", self._run_id, error)

    def _restore_signals(self) -> None:
        if self._signals is not None:
            self._signals.close()
            self._signals = None
