"""Project hooks: checks before the first node, the project root for relative paths, a readable MLflow
store, MLflow runs named and linked, and signals as clean stops."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import click
from kedro.framework.hooks import hook_impl

from food_multids.config.paths import use_project_root
from food_multids.helpers.interrupts import RunInterrupted, raise_on_signals
from food_multids.runtime.node_zero import finish_session

logger = logging.getLogger(__name__)
# Written by the train pipeline in the same session as best_model, so they share its version string.
BEST_MODEL_COMPANIONS = ("training_history", "best_model_info", "checkpoint_manifest", "dataset_stats",
                         "candidate_evals")


def quiet_instant_progress_bars() -> None:
    """Transformers' 'Loading weights' / 'Writing model shards' bars finish in milliseconds for a model
    folder and print one line per save in a log: off for `kedro run` (global to the process, set here)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story (a setting, a row, a model that does not fit, a folder): a
    node that raises one ends the run like preflight does, with the message once, no traceback, exit 1."""
    from food_multids.config import ConfigError
    from food_multids.data.labels import LabelNameError
    from food_multids.data.records import RecordError
    from food_multids.evaluation.full import ModelMismatchError
    from food_multids.inference.predict import PredictSettingError
    from food_multids.training.checkpoint import CheckpointIntegrityError
    from food_multids.training.output_dir import OutputDirError

    return (ConfigError, RecordError, LabelNameError, ModelMismatchError, OutputDirError, CheckpointIntegrityError,
            PredictSettingError)


class NodeError(click.ClickException):
    """One of `user_error_types`, raised by a node: click prints `Error: <message>` and exits 1."""


class StoppedBySignal(click.ClickException):
    """The run was stopped on purpose (Ctrl-C, SIGTERM): click prints `Error: <message>`, and the exit code is
    a shell's for that signal (130, 143), as schedulers expect of a stopped job."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.exit_code = 128 + int(getattr(error, "signum", 15))


class _UserErrorFilter(logging.Filter):
    """Drops Kedro's 'Node ... failed with error' and 'Repeat the previous command' records while one of our
    own errors (or a stop by a signal) is being handled (both are logged inside the except block that caught
    it): the run's last line says it once, and repeating the command cannot help before the data or settings
    change."""

    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, RunInterrupted):  # while stopping, our own lines (what was signalled) still count
            return not record.name.startswith("kedro")
        return error is None or not isinstance(error, user_error_types())


USER_ERROR_FILTER = _UserErrorFilter()


class MlflowStoreError(click.ClickException):
    """The sqlite file behind the MLflow tracking URI cannot be read. The message names the file and the
    way out; click prints it without a traceback, as it does preflight's."""


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


def sqlite_path(uri: str | None) -> Path | None:
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


class PreflightHooks:
    """Checks the whole run before its first node and before kedro-mlflow opens an MLflow run."""

    def __init__(self) -> None:
        self.conf_catalog: dict = {}
        self.project_path = Path.cwd()
        self.config_loader = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        self.config_loader = context.config_loader

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, save_version, load_versions) -> None:
        self.conf_catalog = conf_catalog or {}
        pin_companions(catalog, self.conf_catalog, load_versions or {}, save_version, self.project_path)

    @hook_impl(tryfirst=True)  # before kedro-mlflow starts a run: a config error leaves no run behind
    def before_pipeline_run(self, run_params: dict, pipeline, catalog) -> None:
        from kedro.framework.project import pipelines

        from food_multids.framework.preflight import PreflightError, RunPlan, check_run, makers_of
        from food_multids.framework.run_context import set_run_env

        env = run_params.get("env") or "local"
        set_run_env(env)
        free = sorted(n for n in pipeline.inputs() if n != "parameters" and not n.startswith("params:"))
        outputs = {}
        for name in pipeline.all_outputs():
            config = self.conf_catalog.get(name) or {}
            if config.get("filepath"):  # a versioned dataset's filepath is a folder of versions
                path = self.project_path / config["filepath"]
                outputs[name] = path if config.get("versioned") else path.parent
        conf_source = getattr(self.config_loader, "conf_source", None)
        plan = RunPlan(env=env, node_names={n.name for n in pipeline.nodes}, free_inputs=free, output_paths=outputs,
                       conf_source=conf_source)
        params = catalog.load("parameters")
        swapped = use_predict_model(catalog, params) if "ingest_images" in plan.node_names else []
        found = check_run(plan, params, catalog.exists, makers_of(pipelines, free, env), catalog.load)
        # --params that could not apply
        found.problems[:0] = [*getattr(self.config_loader, "layer_problems", []), *swapped]
        for warning in found.warnings:
            logger.warning("\n%s\n!! %s\n%s", "!" * 100, warning, "!" * 100)
        if found.problems:
            raise PreflightError(found.problems, env, conf_source)
        if plan.node_names & LAUNCHING_NODES:
            problem = open_node_session(params)
            if problem:
                raise PreflightError([problem], env, conf_source)


def pin_companions(catalog, conf_catalog: dict, load_versions: dict, save_version: str, project_path: Path) -> None:
    """`--load-versions best_model:<v>`: the report must describe that model's run, so the datasets that
    run wrote beside it (same version string) are loaded at <v> too unless pinned otherwise."""
    from kedro.io import AbstractDataset

    version = load_versions.get("best_model")
    if not version:
        return
    for name in BEST_MODEL_COMPANIONS:
        config = conf_catalog.get(name)
        if name in load_versions or not config or "filepath" not in config:
            continue
        folder = project_path / config["filepath"] / version
        if not folder.exists():
            logger.warning("best_model is pinned to %s but %s has no version %s: the newest %s is used",
                           version, name, version, name)
            continue
        replacing = logging.getLogger("kedro.io.data_catalog")
        level = replacing.level
        replacing.setLevel(logging.ERROR)  # its "Replacing dataset" warning: this replacement is the point
        try:
            catalog[name] = AbstractDataset.from_config(name, {**config, "filepath": str(folder.parent)},
                                                        load_version=version, save_version=save_version)
        finally:
            replacing.setLevel(level)
        logger.info("%s loaded at version %s, beside the pinned best_model", name, version)


def use_predict_model(catalog, params: dict) -> list[str]:
    """predict.model set: the predict pipeline reads that folder or MLflow model instead of the catalog's
    versioned best_model. Returns the problem, if any."""
    from food_multids.catalog import ModelDirectoryDataset
    from food_multids.inference.source import local_model_dir

    source = (params.get("predict") or {}).get("model") if isinstance(params, dict) else None
    if not source:
        return []
    try:
        folder = local_model_dir(str(source))
    except Exception as exc:  # not found, not a model, an unknown registry version ...
        return [f"params:predict.model {source!r}: {exc}"]
    catalog["best_model"] = ModelDirectoryDataset(str(folder))
    logger.info("predict reads the model %s (predict.model %s)", folder, source)
    return []


class ProjectHooks:
    def __init__(self) -> None:
        self._run_scope: contextlib.ExitStack | None = None
        self._run_id: str | None = None
        self._context = None

    @hook_impl(tryfirst=True)  # before kedro-mlflow opens the store
    def after_context_created(self, context) -> None:
        # Nodes, notebooks and (through their launch spec) the ranks resolve relative parameters against this
        # folder, whatever the current directory is.
        use_project_root(context.project_path)
        self._context = context
        quiet_instant_progress_bars()
        for name in ("kedro.pipeline.node", "kedro.runner"):
            logging.getLogger(name).addFilter(USER_ERROR_FILTER)
        for handler in logging.getLogger().handlers:  # records of child loggers reach the root's handlers
            if USER_ERROR_FILTER not in handler.filters:
                handler.addFilter(USER_ERROR_FILTER)
        try:
            uri = context.config_loader["mlflow"].get("server", {}).get("mlflow_tracking_uri")
        except Exception:  # no mlflow.yml in this environment: kedro-mlflow reports that itself
            return
        path = sqlite_path(uri)
        if path is not None:
            check_sqlite_store(path)

    @hook_impl(trylast=True)  # after kedro-mlflow has started the run
    def before_pipeline_run(self, run_params: dict, pipeline, catalog) -> None:
        import mlflow

        run = mlflow.active_run()
        self._run_id = run.info.run_id if run else None
        if self._run_id:
            from food_multids.framework.mlflow_runs import describe_run

            try:
                describe_run(self._run_id, run_params, {n.name for n in pipeline.nodes}, catalog)
            except Exception as exc:  # naming is a courtesy: never the reason a run does not start
                logger.warning("Could not name or link MLflow run %s: %s", self._run_id, exc)
        self._run_scope = contextlib.ExitStack()
        if self._run_id and "train_deepspeed" in {n.name for n in pipeline.nodes}:
            self._run_scope.callback(start_system_metrics(self._run_id))
        self._run_scope.enter_context(raise_on_signals())

    @hook_impl(tryfirst=True)  # before other hooks can raise past it
    def after_pipeline_run(self, pipeline) -> None:
        self._close_run_scope()
        finish_session(ok=True)  # a torchrun run's node workers exit
        if self._context is not None:
            from food_multids.framework.run_summary import report_run_results

            report_run_results(Path(self._context.project_path), self._context.config_loader["catalog"],
                               pipeline.all_outputs(), self._run_id)

    @hook_impl(trylast=True)  # after kedro-mlflow has ended the run as FAILED
    def on_pipeline_error(self, error: Exception) -> None:
        self._close_run_scope()
        finish_session(ok=False, message=f"{type(error).__name__}: {error}")
        if isinstance(error, user_error_types()):
            raise NodeError(str(error)) from None  # after kedro-mlflow has marked the run FAILED
        if isinstance(error, RunInterrupted):
            if self._run_id:
                import mlflow
                from mlflow.tracking import MlflowClient

                # A run stopped on purpose (Ctrl-C, a cluster's pre-emption) is KILLED, not FAILED or FINISHED.
                MlflowClient(mlflow.get_tracking_uri()).set_terminated(self._run_id, "KILLED")
                logger.warning("MLflow run %s marked KILLED", self._run_id)
            raise StoppedBySignal(error) from None  # the message once, no traceback, exit 128 + the signal

    def _close_run_scope(self) -> None:
        if self._run_scope is not None:
            self._run_scope.close()
            self._run_scope = None


LAUNCHING_NODES = {"train_deepspeed", "rerank_candidates", "full_evaluate", "predict"}  # may start several processes


def open_node_session(params: dict) -> str | None:
    """A torchrun run opens node 0's store before its first node (and before MLflow starts a run): the node
    workers claim their ranks there while Kedro prepares the data. Returns the problem, if it cannot."""
    from food_multids.config import TrainConfig
    from food_multids.runtime.cluster import NodeFailure
    from food_multids.runtime.node_zero import open_session

    training = TrainConfig.from_section(params.get("training"))
    if training.launch_mode() != "torchrun":
        return None
    try:
        open_session(training)
    except NodeFailure as exc:
        return f"params:training.nodes: {exc}"
    return None


def start_system_metrics(run_id: str):
    """CPU, memory, disk, network (and GPU where nvidia-ml-py finds one) of this machine as `system/*`
    metrics of the run, sampled every 10 s by a thread of this process while the training processes
    run. Not mlflow's global switch: kedro-mlflow reopens the run for every node, and each reopening
    would start another sampler. Returns the function that stops it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id)
    monitor.start()
    return monitor.finish
