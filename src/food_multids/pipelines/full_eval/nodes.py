"""full_eval nodes: full_evaluate -> report."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.evaluation.build_report import build_report
from food_multids.evaluation.full import run_full_evaluation

logger = logging.getLogger(__name__)


def _log_to_mlflow(metrics: dict[str, float] | None = None, texts: dict[str, str] | None = None) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    if metrics:
        mlflow.log_metrics(metrics)
    for name, text in (texts or {}).items():
        mlflow.log_text(text, name)


def full_evaluate(best_model: Path, full_eval_set: pd.DataFrame, parameters: dict
                  ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Evaluate the best model on every dataset's full validation set (masked as in training).

    Returns per-dataset and overall metrics (loss, top-1, top-k, macro-F1, samples), a predictions
    table (sample id, dataset, label, prediction, top-k, confidence) and sparse confusion counts.
    """
    cfg = ProjectConfig.from_params(parameters, check_files=False)
    result = run_full_evaluation(cfg, Path(best_model), full_eval_set)
    _log_to_mlflow({f"final_eval_{k}": v for k, v in result.metrics.items()})
    return {"model_dir": str(best_model), **result.metrics}, result.predictions, result.confusions


def report(training_history: dict, eval_metrics: dict, predictions: pd.DataFrame, confusions: pd.DataFrame,
           dataset_stats: pd.DataFrame, best_model_info: dict, parameters: dict) -> tuple[str, str]:
    """Self-contained HTML report and Markdown summary; both also logged to MLflow as artifacts."""
    cfg = ProjectConfig.from_params(parameters, check_files=False)
    built = build_report(cfg, training_history, eval_metrics, predictions, confusions, dataset_stats, best_model_info)
    page, summary = built.html(), "\n".join(built.markdown)
    _log_to_mlflow(texts={"report/report.html": page, "report/report.md": summary})
    return page, summary
