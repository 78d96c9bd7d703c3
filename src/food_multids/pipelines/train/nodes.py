"""Train nodes: train_deepspeed -> rerank_candidates -> select_best.

Each node takes the parameter sections it reads (`params:model`, `params:training`, ...), the names in
its *_SECTIONS tuple, parsed together by ProjectConfig.from_params; the whole-config checks ran in preflight."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.framework.run_context import run_env
from food_multids.tracking import log_once
from food_multids.training.run import run_training

logger = logging.getLogger(__name__)

TRAIN_SECTIONS = ("model", "data", "datasets", "training", "evaluation", "tracking", "deepspeed")
RERANK_SECTIONS = ("model", "data", "datasets", "training", "evaluation", "tracking")
SELECT_SECTIONS = ("model", "data", "datasets", "training", "evaluation")  # for evaluation.calibrate


def train_deepspeed(train_set: pd.DataFrame, eval_subset: pd.DataFrame, full_eval_set: pd.DataFrame, model: dict,
                    data: dict, datasets: dict, training: dict, evaluation: dict, tracking: dict, deepspeed: dict | str
                    ) -> tuple[dict, dict]:
    """Train with DeepSpeed (in this process, or under a launcher for several processes).

    Writes checkpoints and the best model under training.output_dir (the one node with file side
    effects); returns the training history (per-step train/eval metrics) and the checkpoint manifest.
    """
    sections = {"model": model, "data": data, "datasets": datasets, "training": training, "evaluation": evaluation,
                "tracking": tracking, "deepspeed": deepspeed}
    cfg = ProjectConfig.from_params(sections, check_files=False)
    result = run_training(cfg, sections, train_set, eval_subset, full_eval_set)
    return result.history, result.manifest


def rerank_candidates(checkpoint_manifest: dict, full_eval_set: pd.DataFrame, model: dict, data: dict,
                      datasets: dict, training: dict, evaluation: dict, tracking: dict) -> dict:
    """Score each model training kept as a candidate (training.keep_top_k_checkpoints) on the full validation
    set, where the partial evaluation's noise is gone. One candidate: nothing to score."""
    from food_multids.evaluation.full import evaluate_saved_model

    best = checkpoint_manifest.get("best") or {}
    candidates, key = best.get("candidates") or [], best.get("metric")
    if len(candidates) < 2:
        return {"metric": key, "candidates": candidates, "reranked": False}
    sections = {"model": model, "data": data, "datasets": datasets, "training": training, "evaluation": evaluation,
                "tracking": tracking}
    cfg = ProjectConfig.from_params(sections, check_files=False)
    scored = []
    evaluation_log = logging.getLogger("food_multids.evaluation.full")
    for candidate in candidates:
        level = evaluation_log.level  # each candidate's per-dataset lines: at DEBUG, one line per candidate here
        evaluation_log.setLevel(logging.WARNING)
        try:
            metrics = evaluate_saved_model(cfg, sections, Path(candidate["path"]), full_eval_set,
                                           "launch_rerank").metrics
        finally:
            evaluation_log.setLevel(level)
        scored.append({**candidate, "full_value": metrics[key], "full_overall_accuracy": metrics["overall_accuracy"]})
        logger.info("Re-rank: step %d has %s %.4f on the partial subset, %.4f on the full validation set",
                    candidate["step"], key, candidate["value"], metrics[key])
    step = int(checkpoint_manifest.get("final_step") or 0) + 1
    log_once(cfg, {f"final_eval_candidate_{c['step']}_{key}": c["full_value"] for c in scored}, step,
             checkpoint_manifest.get("mlflow_run_id"))
    return {"metric": key, "candidates": scored, "reranked": True}


def select_best(training_history: dict, checkpoint_manifest: dict, candidate_evals: dict | None = None,
                full_eval_set: pd.DataFrame | None = None, model: dict | None = None, data: dict | None = None,
                datasets: dict | None = None, training: dict | None = None, evaluation: dict | None = None
                ) -> tuple[Path, dict]:
    """The best model directory (saved as a versioned catalog dataset) and its description: the candidate
    with the best full-set metric when candidates were re-ranked, else the partial evaluation's best.
    With evaluation.calibrate, its temperatures are fitted first (evaluation/calibration.py), so the
    catalog's copy, the registered model and every prediction carry them (without the sections and the
    full set, as from a script: no calibration)."""
    best = checkpoint_manifest.get("best")
    if not best:
        raise ValueError("training produced no evaluated model: check training.eval_steps and max_steps")
    chosen, how = best, f"partial evaluation ({best.get('selection', 'point')} rule)"
    reason = best.get("best_model_reason")
    candidates = (candidate_evals or {}).get("candidates") or []
    if (candidate_evals or {}).get("reranked"):
        sign = 1.0 if best["greater_is_better"] else -1.0
        # Ties go to the partial evaluation's choice, then to the earlier step.
        chosen = min(candidates, key=lambda c: (-sign * c["full_value"], c["step"] != best["step"], c["step"]))
        how = f"full-set re-rank of {len(candidates)} candidates"
        partial = next(c for c in candidates if c["step"] == best["step"])
        reason = (f"full-set re-rank: step {chosen['step']} has {best['metric']} {chosen['full_value']:.4f} on the "
                  f"full validation set, the best of {len(candidates)} candidates (the partial evaluation's pick, step "
                  f"{best['step']}: {partial['full_value']:.4f})")
    path = Path(chosen.get("path") or best["path"])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the best model directory {path} is missing or incomplete")
    info = {"metric": best["metric"], "value": chosen["value"], "step": chosen["step"],
            "greater_is_better": best["greater_is_better"], "eval_subset_strategy": best.get("subset"),
            "source_path": str(path), "mlflow_run_id": checkpoint_manifest.get("mlflow_run_id"),
            "final_step": checkpoint_manifest.get("final_step"), "datasets": training_history.get("datasets"),
            "selected_by": how, "partial_best_step": best["step"], "full_value": chosen.get("full_value"),
            "best_model_reason": reason, "partial_best_reason": best.get("best_model_reason"), "candidates": candidates}
    if model is not None and data is not None and full_eval_set is not None:
        cfg = ProjectConfig.from_params({"model": model, "data": data, "datasets": datasets, "training": training,
                                         "evaluation": evaluation}, check_files=False)
        if cfg.evaluation.calibrate:
            from food_multids.evaluation.calibration import calibrate_model

            info["calibration"] = calibrate_model(cfg, path, full_eval_set)
    env = run_env()
    if env is not None:  # predict and full_eval name the env that made the model they are asked to read
        info["kedro_env"] = env
        record_training_env(path, env)
    value, where = (chosen["full_value"], "full validation set") if chosen.get("full_value") is not None else \
        (chosen["value"], "partial evaluation")
    logger.info("Best model: %s = %.4f (%s) at step %d, chosen by %s (%s)", info["metric"], value, where,
                info["step"], how, path)
    return path, info


def record_training_env(model_dir: Path, env: str) -> None:
    """Add the Kedro env of the training run to the model's training_info.json (it travels with the model into
    the catalog's best_model versions, exports and registered MLflow models)."""
    from food_multids.model.classifier import TRAINING_INFO
    from food_multids.runtime.files import write_json_atomic

    info_file = Path(model_dir) / TRAINING_INFO
    if info_file.is_file():
        write_json_atomic(info_file, {**json.loads(info_file.read_text()), "kedro_env": env})
