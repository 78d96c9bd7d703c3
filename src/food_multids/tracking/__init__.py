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

    def __init__(self, cfg: ProjectConfig, run_id: str | None, tracking_uri: str | None, enabled: bool = True):
        self.run_id = run_id if enabled else None
        self.sinks: list[Sink] = []
        if not enabled:
            return
        for name in cfg.tracking.report_to:
            sink = SINKS[name].open(cfg, run_id, tracking_uri)
            if sink is not None:
                self.sinks.append(sink)
        if not self.sinks:
            logger.info("No tracker to log to: metrics go to the logs and the training history only")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            for sink in self.sinks:
                sink.log({k: float(v) for k, v in metrics.items()}, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
