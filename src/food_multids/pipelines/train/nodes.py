"""Train nodes: train_deepspeed -> select_best."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.training.launcher import run_training

logger = logging.getLogger(__name__)


def train_deepspeed(train_set: pd.DataFrame, eval_subset: pd.DataFrame, full_eval_set: pd.DataFrame,
                    parameters: dict) -> tuple[dict, dict]:
    """Train with DeepSpeed (in this process, or under the DeepSpeed launcher for several processes).

    Writes checkpoints and the best model under training.output_dir (the one node with file side
    effects); returns the training history (per-step train/eval metrics) and the checkpoint manifest.
    """
    cfg = ProjectConfig.from_params(parameters, check_files=False)
    result = run_training(cfg, parameters, train_set, eval_subset, full_eval_set)
    return result.history, result.manifest


def select_best(training_history: dict, checkpoint_manifest: dict) -> tuple[Path, dict]:
    """The best model directory (saved as a versioned catalog dataset) and its description."""
    best = checkpoint_manifest.get("best")
    if not best:
        raise ValueError("training produced no evaluated model: check training.eval_steps and max_steps")
    path = Path(best["path"])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the best model directory {path} is missing or incomplete")
    info = {"metric": best["metric"], "value": best["value"], "step": best["step"],
            "greater_is_better": best["greater_is_better"], "eval_subset_strategy": best.get("subset"),
            "source_path": str(path), "mlflow_run_id": checkpoint_manifest.get("mlflow_run_id"),
            "final_step": checkpoint_manifest.get("final_step"), "datasets": training_history.get("datasets")}
    logger.info("Best model: %s = %.4f at step %d (%s)", info["metric"], info["value"], info["step"], path)
    return path, info
