"""full_eval node: full_evaluate (the report pipeline, pipelines/report/, draws what it measured)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.evaluation.full import check_model_dir, evaluate_saved_model, read_model_info
from food_multids.tracking import log_once

logger = logging.getLogger(__name__)

EVAL_SECTIONS = ("model", "data", "datasets", "training", "evaluation", "tracking")


def mlflow_active() -> bool:
    import mlflow

    return mlflow.active_run() is not None


def full_evaluate(best_model: Path, full_eval_set: pd.DataFrame, model: dict, data: dict, datasets: dict,
                  training: dict, evaluation: dict, tracking: dict, best_model_info: dict | None = None
                  ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Evaluate the best model on every dataset's full validation set (masked as in training).

    Returns per-dataset and overall metrics (loss, top-1 with its interval, top-k, macro-F1, samples; with
    the full-set scores of the re-ranked candidates when `best_model_info` describes this model), a
    predictions table (sample id, dataset, label, prediction, top-k, confidence) and sparse confusion counts.
    """
    sections = {"model": model, "data": data, "datasets": datasets, "training": training, "evaluation": evaluation,
                "tracking": tracking}
    cfg = ProjectConfig.from_params(sections, check_files=False)
    check_model_dir(cfg, Path(best_model))  # before starting any process
    result = evaluate_saved_model(cfg, sections, Path(best_model), full_eval_set)
    metrics, predictions, confusions = result.metrics, result.predictions, result.confusions
    info = read_model_info(Path(best_model))
    same_model = best_model_info and all(best_model_info.get(k) == info.get(k) for k in ("mlflow_run_id", "step"))
    candidates = best_model_info["candidates"] if same_model and best_model_info.get("candidates") else []
    # One step after the training's last, two after a re-rank (whose candidate scores took the first): every
    # tracker then sees strictly growing steps (WandB drops a step at or below the last one of a resumed
    # run); WandB/TensorBoard continue the training's run.
    rescored = any("full_value" in c for c in candidates)
    step = int(info.get("final_step") or info.get("step") or 0) + (2 if rescored else 1)
    log_once(cfg, {f"final_eval_{k}": v for k, v in metrics.items()}, step, info.get("mlflow_run_id"))
    tagged = []
    if mlflow_active():  # the registered versions of the training run say how good they are
        from food_multids.pipelines.predict.serving import tag_final_accuracy

        tagged = tag_final_accuracy(info.get("mlflow_run_id"), metrics)
    if tagged:
        logger.info("Tagged %s with final_overall_accuracy %.4f", ", ".join(tagged), metrics["overall_accuracy"])
    reranked = {"candidates": candidates} if candidates else {}
    curves = {"calibration_curves": result.calibration_curves} if result.calibration_curves else {}
    return ({"model_dir": str(best_model), "model_info": info, **metrics, **reranked, **curves}, predictions,
            confusions)
