"""MLflow logging from the training process: rank 0 only, into the Kedro session's run."""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)


def active_run_target() -> tuple[str | None, str | None]:
    """(run_id, tracking_uri) of the active MLflow run (kedro-mlflow opens one per `kedro run`)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_TRACKING_URI")
    return run.info.run_id, mlflow.get_tracking_uri()


class MetricsLogger:
    """Sends metric batches to one MLflow run by id; a no-op on ranks > 0 or without a run."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, enabled: bool = True):
        self.run_id = run_id if enabled else None
        self._client = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
        elif enabled:
            logger.info("No active MLflow run: metrics go to the logs and the training history only")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's per-request limit
            self._client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._client is not None:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, value)
