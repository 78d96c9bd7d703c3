"""report node: the HTML report and Markdown summary of a trained and fully evaluated model."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig, recorded_config
from food_multids.config.paths import find_project_root, resolve_path
from food_multids.report.build import Provenance, build_report, git_commit

logger = logging.getLogger(__name__)

REPORT_SECTIONS = ("model", "data", "datasets", "training", "evaluation", "deepspeed")  # what its tables show


def _log_texts_to_mlflow(texts: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    for name, text in texts.items():
        mlflow.log_text(text, name)


def evaluated_model_info(eval_metrics: dict, best_model_info: dict) -> dict:
    """What the report names: the model full_evaluate actually loaded (it records its own run and step).

    `best_model_info` is the newest catalog version, which is not the evaluated model when the newest
    best_model version was deleted or an older one pinned with --load-versions.
    """
    info = eval_metrics.get("model_info") or {}
    if not info.get("step"):
        return best_model_info
    for key in ("mlflow_run_id", "step"):
        if best_model_info.get(key) != info.get(key):
            logger.warning("The evaluated model %s comes from run %s step %s, not from best_model_info's run %s "
                           "step %s (newest version): the report describes the evaluated model",
                           info.get("source_path"), info.get("mlflow_run_id"), info.get("step"),
                           best_model_info.get("mlflow_run_id"), best_model_info.get("step"))
            break
    return {**best_model_info, **info,
            "eval_subset_strategy": info.get("subset", best_model_info.get("eval_subset_strategy"))}


def trained_config(model_info: dict) -> ProjectConfig | None:
    """The settings the evaluated model was trained with (recorded in its folder), or None."""
    return recorded_config(model_info, "the report shows the current parameters instead")


def _run_tag(active, run_id: str | None, key: str) -> str | None:
    """A tag of an MLflow run in the active run's store (None without an active run or that run)."""
    if active is None or not run_id:
        return None
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id).data.tags.get(key)
    except Exception:  # a run from another store, or deleted
        return None


def report(training_history: dict, eval_metrics: dict, predictions: pd.DataFrame, confusions: pd.DataFrame,
           dataset_stats: pd.DataFrame, best_model_info: dict, model: dict, data: dict, datasets: dict,
           training: dict, evaluation: dict, deepspeed: dict | str) -> tuple[str, str]:
    """Self-contained HTML report and Markdown summary; both also logged to MLflow as artifacts."""
    import mlflow

    cfg = ProjectConfig.from_params({"model": model, "data": data, "datasets": datasets, "training": training,
                                     "evaluation": evaluation, "deepspeed": deepspeed}, check_files=False)
    best = evaluated_model_info(eval_metrics, best_model_info)
    model_info = eval_metrics.get("model_info") or {}
    trained = trained_config(model_info)
    active = mlflow.active_run()
    report_run = active.info.run_id if active else None
    where = Provenance(training_run_id=best.get("mlflow_run_id"), report_run_id=report_run,
                       created=time.time(), git_commit=git_commit(find_project_root()),
                       model_dir=str(model_info.get("source_path")
                                     or Path(eval_metrics.get("model_dir", "")).resolve()),
                       backbone=model_info.get("backbone") or str(resolve_path(cfg.model.name_or_path)),
                       training_env=_run_tag(active, best.get("mlflow_run_id"), "food_multids.env"),
                       report_env=_run_tag(active, report_run, "food_multids.env"))
    built = build_report(cfg, training_history, eval_metrics, predictions, confusions, dataset_stats, best, where,
                         trained=trained)
    page, summary = built.html(), "\n".join(built.markdown)
    _log_texts_to_mlflow({"report/report.html": page, "report/report.md": summary})
    return page, summary
