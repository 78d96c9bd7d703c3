"""The final evaluation of a saved classifier on every dataset's full validation set."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.helpers.metrics import (
    format_eval_lines,
    full_set_intervals,
    macro_f1,
    summarize,
    topk_accuracy,
)
from food_multids.inference.model import load_model, run_model
from food_multids.model.classifier import (
    CLASSIFIER_FILE,
    TRAINING_INFO,
    ClassifierMeta,
    MultiDatasetClassifier,
)
from food_multids.runtime.device import init_distributed, resolve_device
from food_multids.runtime.scoring import gather_rows

logger = logging.getLogger(__name__)


@dataclass
class FullEvalResult:
    metrics: dict[str, float]
    predictions: pd.DataFrame
    confusions: pd.DataFrame
    calibration_curves: dict = field(default_factory=dict)  # per dataset: reliability bins, coverage curve


def _names(model: MultiDatasetClassifier, dataset: str, ids: np.ndarray) -> list[str | None]:
    space = model.meta.label_spaces.get(dataset)
    names = space.id2label if space is not None else None
    return [names[i] if names is not None and 0 <= i < len(names) else None for i in ids]


class ModelMismatchError(ValueError):
    """The model's label spaces are not the configured datasets."""


def check_label_spaces(cfg: ProjectConfig, model_dir: Path, meta: ClassifierMeta) -> None:
    """The model must know every configured dataset at the same head position with the same class count;
    otherwise targets index past its classes (IndexError deep in the loss) or mean other classes."""
    have = {name: (space.dataset_id, space.num_classes) for name, space in meta.label_spaces.items()}
    want = {d.name: (d.index, d.num_classes) for d in cfg.datasets}
    if have == want:
        return
    def show(spaces: dict[str, tuple[int, int]]) -> str:
        return ", ".join(f"{n} (#{i}, {c} classes)" for n, (i, c) in spaces.items())

    raise ModelMismatchError(
        f"the model {model_dir} was trained on the label spaces {show(have)}, but datasets.dataset_configs "
        f"configures {show(want)}: evaluate it with the dataset_configs it was trained with, or pick the model "
        "trained on these with --load-versions best_model:<version>")


def read_model_info(model_dir: Path) -> dict:
    """The run, step and metric that produced a model directory (empty for one saved before they were recorded)."""
    info_file = model_dir / TRAINING_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {**info, "source_path": str(Path(model_dir).resolve())}


def check_model_dir(cfg: ProjectConfig, model_dir: Path) -> None:
    if (model_dir / CLASSIFIER_FILE).is_file():  # otherwise from_pretrained says what is missing
        check_label_spaces(cfg, model_dir, ClassifierMeta.from_json((model_dir / CLASSIFIER_FILE).read_text()))


def run_full_evaluation(cfg: ProjectConfig, model_dir: Path, frame: pd.DataFrame) -> FullEvalResult:
    """Every row of `frame` through the saved model (sharded over the ranks): the predict loop's rows,
    scored into metrics, predictions and confusions."""
    check_model_dir(cfg, model_dir)
    device = resolve_device(cfg)
    rank, world = init_distributed(device, cfg.training.master_port)
    loaded = load_model(model_dir, device, cfg.model)
    workers = cfg.evaluation.dataloader_num_workers
    names = list(cfg.dataset_names)
    calibration = loaded.model.meta.calibration
    # With fitted temperatures, each image is also scored at T = 1 and at its dataset's T (calibration metrics).
    grid = np.array([[1.0, float(calibration["temperature"].get(n, 1.0))] for n in names]) if calibration else None
    out = run_model(loaded, frame, batch_size=cfg.evaluation.batch_size or cfg.training.per_device_eval_batch_size,
                    top_k=cfg.evaluation.top_k, rank=rank, world=world,
                    workers=cfg.training.dataloader_num_workers if workers is None else workers,
                    max_consecutive_bad_images=cfg.training.max_consecutive_bad_images, desc="full eval",
                    progress_mode=cfg.training.progress_bar, temperature_grid=grid)
    model = loaded.model
    preds = predictions_frame(gather_rows(out.predictions, world), frame)
    metrics = summarize(out.loss_sum, out.correct, out.count, names)
    metrics.update(full_set_intervals(out.correct, out.count, names, cfg.evaluation.confidence))
    metrics.update(ranking_metrics(cfg, model, preds))
    if not model.meta.enable_logits_masking:
        metrics["out_of_range_predictions"] = float(out.out_of_range)
    metrics["skipped_images"] = float(out.skipped)
    for spec in cfg.datasets:
        metrics[f"{spec.name}_skipped_images"] = float(out.skipped_per_dataset[spec.index])
    curves: dict = {}
    if calibration:
        from food_multids.evaluation.calibration import held_out_metrics

        calibrated, curves = held_out_metrics(preds, names, calibration)
        metrics.update(calibrated)
        preds["confidence_calibrated"] = [row[1] for row in preds["grid_conf"]]
        preds = preds.drop(columns=["grid_nll", "grid_conf"])
    confusions = preds.groupby(["dataset_name", "label", "prediction"]).size().rename("count").reset_index()
    logger.info("Full evaluation of %s:", model_dir)
    for line in format_eval_lines(metrics, names):
        logger.info(line)
    for name in names:
        if f"{name}_ece" in metrics:
            logger.info("   %s calibration (T = %.3g, %d held-out images): ECE %.4f -> %.4f, NLL %.4f -> %.4f",
                        name, metrics[f"{name}_temperature"], metrics[f"{name}_calibration_held_out_images"],
                        metrics[f"{name}_ece"], metrics[f"{name}_ece_calibrated"], metrics[f"{name}_nll"],
                        metrics[f"{name}_nll_calibrated"])
    return FullEvalResult(metrics, preds, confusions, curves)


def evaluate_saved_model(cfg: ProjectConfig, parameters: dict, model_dir: Path, frame: pd.DataFrame,
                         launch_name: str = "launch_eval") -> FullEvalResult:
    """`run_full_evaluation` in this process, or one process per GPU under the launcher (each on its shard;
    rank 0 gathers the rows and writes them to <output_dir>/<launch_name>)."""
    from food_multids.runtime.launch import launch_processes, resolve_world_size, uses_launcher

    world = resolve_world_size(cfg.training)
    if not uses_launcher(cfg.training, world):
        return run_full_evaluation(cfg, model_dir, frame)
    launch = cfg.training.resolved_output_dir() / launch_name
    result, frames = launch_processes(cfg.training, world, launch, parameters, {"full_eval": frame},
                                      "food_multids.evaluation.worker", extra={"model_dir": str(model_dir)})
    return FullEvalResult(result["metrics"], frames["predictions"], frames["confusions"],
                          result.get("calibration_curves") or {})


def predictions_frame(rows: dict[str, list], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated image: ids, label, prediction, confidence, loss, top-k, image path, dataset."""
    preds = pd.DataFrame({k: rows[k] for k in ("sample_id", "dataset_id", "label", "prediction", "confidence", "loss")})
    preds["topk"] = rows["topk"]
    preds["topk_prob"] = rows["topk_prob"]
    for key in ("grid_nll", "grid_conf"):  # scored at several temperatures (calibration)
        if key in rows:
            preds[key] = rows[key]
    preds = preds.join(frame.set_index("sample_id")[["image", "dataset_name"]], on="sample_id")
    preds["dataset_name"] = preds["dataset_name"].astype(str)
    return preds


def ranking_metrics(cfg: ProjectConfig, model: MultiDatasetClassifier, preds: pd.DataFrame) -> dict[str, float]:
    """Top-k accuracy (where a dataset has more than k classes) and macro-F1 per dataset; class names
    are added to `preds` on the way."""
    metrics: dict[str, float] = {}
    k = cfg.evaluation.top_k
    ranked = cfg.topk_datasets()
    if len(ranked) < len(cfg.datasets):
        logger.warning("No top-%d accuracy for %s: they have at most %d classes, so it would be 1.0 by construction",
                       k, [d.name for d in cfg.datasets if d not in ranked], k)
    for spec in cfg.datasets:
        mine = preds["dataset_id"] == spec.index
        labels = preds.loc[mine, "label"].to_numpy()
        predicted = preds.loc[mine, "prediction"].to_numpy()
        topk = np.array(preds.loc[mine, "topk"].tolist()).reshape(len(labels), -1)
        if len(labels):
            if spec in ranked:
                metrics[f"{spec.name}_top{k}_accuracy"] = topk_accuracy(labels, topk, k)
            metrics[f"{spec.name}_macro_f1"] = macro_f1(labels, predicted, spec.num_classes)
        preds.loc[mine, "label_name"] = _names(model, spec.name, labels)
        preds.loc[mine, "prediction_name"] = _names(model, spec.name, predicted)
    in_ranked = preds["dataset_id"].isin([d.index for d in ranked]).to_numpy()
    if in_ranked.any():  # over the datasets where top-k means something
        ranked_topk = np.array(preds.loc[in_ranked, "topk"].tolist()).reshape(int(in_ranked.sum()), -1)
        metrics[f"overall_top{k}_accuracy"] = topk_accuracy(preds.loc[in_ranked, "label"].to_numpy(), ranked_topk, k)
    return metrics
