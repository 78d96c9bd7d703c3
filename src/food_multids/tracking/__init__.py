"""Metrics to every tracker of `tracking.report_to` (MLflow, WandB, TensorBoard) through one fan-out.

The training loop and the full evaluation call `Trackers.log(metrics, step)`; each tracker gets the
same names and steps. Only rank 0 logs. MLflow logs into the Kedro session's run (kedro-mlflow opens
it); WandB and TensorBoard use the MLflow run id as their run id, so a full evaluation in another
process continues the training's run, and keep their local files under training.output_dir.
"""

from __future__ import annotations

import logging
import os

from food_multids.config import ProjectConfig
from food_multids.tracking.sinks import SINKS, Sink

logger = logging.getLogger(__name__)


def active_run_target() -> tuple[str | None, str | None]:
    """(run_id, tracking_uri) of the active MLflow run (kedro-mlflow opens one per `kedro run`)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_TRACKING_URI")
    return run.info.run_id, mlflow.get_tracking_uri()


class Trackers:
    """The fan-out: one sink per `tracking.report_to` entry; a no-op on ranks > 0."""

    def __init__(self, cfg: ProjectConfig, run_id: str | None, tracking_uri: str | None, enabled: bool = True,
                 continues: str | None = None):
        """`run_id`: the MLflow run to log into. `continues`: the training run whose WandB/TensorBoard run
        this continues (a full evaluation on its own logs to its own MLflow run, nested under the
        training run, but to the training's WandB and TensorBoard runs); default `run_id`."""
        self.run_id = run_id if enabled else None
        self.sinks: list[Sink] = []
        if not enabled:
            return
        try:
            for name in cfg.tracking.report_to:
                sink = SINKS[name].open(cfg, run_id if name == "mlflow" else (continues or run_id), tracking_uri)
                if sink is not None:
                    self.sinks.append(sink)
        except BaseException:
            self.close(failed=True)  # the ones already open
            raise
        if not self.sinks:
            logger.info("No tracker to log to: metrics go to the logs and the training history only")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            for sink in self.sinks:
                sink.log({k: float(v) for k, v in metrics.items()}, step)

    def close(self, failed: bool = False) -> None:
        """Close every sink (a failing one does not keep the others open or hide the run's own error);
        `failed` marks the run crashed where the tracker records it (WandB's exit code)."""
        for sink in self.sinks:
            try:
                sink.close(failed)
            except Exception as exc:
                logger.warning("Closing the %s tracker failed: %s", type(sink).__name__, exc)
        self.sinks = []


def log_once(cfg: ProjectConfig, metrics: dict[str, float], step: int, continues: str | None) -> None:
    """Metrics at one step to every tracker of the active MLflow run (after training: WandB/TensorBoard
    continue the training run `continues`)."""
    trackers = Trackers(cfg, *active_run_target(), continues=continues)
    try:
        trackers.log(metrics, step)
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()
