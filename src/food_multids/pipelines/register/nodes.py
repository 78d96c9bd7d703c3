"""register node: log_served_model, the train pipeline's last step (the served model,
food_multids.pipelines.predict.serving, runs the predict pipeline's serving nodes: it sits above both, and the
predict nodes import neither)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from food_multids.config import PredictConfig

logger = logging.getLogger(__name__)


def log_served_model(best_model: Path, full_eval_set: pd.DataFrame, predict: dict) -> dict:
    """Log the serving pipeline with this run's best model as an MLflow model and register it."""
    from food_multids.pipelines.predict.serving import log_and_register

    cfg = PredictConfig.from_section(predict)
    if not cfg.log_model:
        logger.info("predict.log_model is false: no MLflow model logged")
        return {"logged": False}
    example = str(full_eval_set["image"].iloc[0]), str(full_eval_set["dataset_name"].iloc[0])
    try:
        return log_and_register(Path(best_model), predict, example)
    except Exception as exc:  # the training is done and its best model saved: this must not fail the run
        logger.warning("The served model was not logged or registered (%s: %s); the best model is in the catalog: "
                       "retry with food_multids.pipelines.predict.serving.log_and_register or `kedro run --pipelines "
                       "train --from-nodes log_served_model`", type(exc).__name__, exc)
        return {"logged": False, "error": f"{type(exc).__name__}: {exc}"}
