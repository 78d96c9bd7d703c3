"""One small adapter per tracker: open for a run, log a metrics dict at a step, close."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from food_multids.config import ProjectConfig

logger = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def flat_params(params: dict, prefix: str = "") -> dict[str, object]:
    """{'training': {'seed': 42}} -> {'training.seed': 42}: the names kedro-mlflow logs (without 'parameters.')."""
    out: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MlflowSink:
    """Metric batches to one MLflow run by id (parameters are logged by kedro-mlflow)."""

    def __init__(self, run_id: str, tracking_uri: str | None):
        from mlflow.tracking import MlflowClient

        self.run_id, self.client = run_id, MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def open(cls, cfg: ProjectConfig, run_id: str | None, tracking_uri: str | None) -> MlflowSink | None:
        if not run_id:
            logger.info("No active MLflow run: nothing is logged to MLflow")
            return None
        return cls(run_id, tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def close(self, failed: bool = False) -> None:
        pass


def _wandb_key_configured() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


class WandbSink:
    """A WandB run with the MLflow run's id (resumed by the full evaluation), files in <output_dir>/wandb."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg: ProjectConfig, run_id: str | None, tracking_uri: str | None) -> WandbSink:
        import wandb

        folder = cfg.training.resolved_output_dir()
        folder.mkdir(parents=True, exist_ok=True)
        mode = cfg.tracking.wandb_mode
        if mode == "auto":
            mode = "online" if _wandb_key_configured() else "offline"
        run = wandb.init(project=cfg.tracking.wandb_project, id=run_id or None, resume="allow", dir=str(folder),
                         mode=os.environ.get("WANDB_MODE") or mode, config=flat_params(cfg.to_params()),
                         name=_mlflow_run_name(run_id, tracking_uri),
                         settings=wandb.Settings(console="off", silent=True))
        if run.settings.mode == "offline":
            logger.info("WandB run %s is offline in %s: upload it with `wandb sync %s`", run.id, run.dir,
                        Path(run.dir).parent)
        return cls(run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)
        if any(key.startswith("final_eval_") for key in metrics):
            self.run.summary.update(metrics)  # the run's final numbers, shown in WandB's runs table

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _mlflow_run_name(run_id: str | None, tracking_uri: str | None) -> str | None:
    """The MLflow run's name (set by the project's hook), so both UIs show the same run name."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.run_name
    except Exception:
        return None


class TensorboardSink:
    """Scalars in <output_dir>/tensorboard/<run id>; the parameters as a text summary."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, cfg: ProjectConfig, run_id: str | None, tracking_uri: str | None) -> TensorboardSink:
        from torch.utils.tensorboard import SummaryWriter

        folder = cfg.training.resolved_output_dir() / "tensorboard" / (run_id or time.strftime("%Y%m%d-%H%M%S"))
        writer = SummaryWriter(log_dir=str(folder))
        writer.add_text("parameters", "```\n" + json.dumps(cfg.to_params(), indent=2) + "\n```")
        return cls(writer)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


SINKS = {"mlflow": MlflowSink, "wandb": WandbSink, "tensorboard": TensorboardSink}
