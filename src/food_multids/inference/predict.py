"""Predictions for records: the shared inference loop's rows as a table of classes, names and
probabilities (a softmax over each image's own dataset's classes: the logits are masked)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from food_multids.config import PredictConfig, TrainConfig
from food_multids.inference.model import LoadedModel, load_model, run_model
from food_multids.runtime.device import resolve_device_name
from food_multids.runtime.launch import launch_processes, uses_launcher, world_size_for

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["row", "image", "dataset_name", "prediction", "prediction_name", "confidence",
                      "top_k_ids", "top_k_names", "top_k_probs", "error"]
UNREADABLE = "the image could not be decoded (see the log)"
UNKNOWN = "unknown"  # prediction_name of an image below predict.reject_below ("none of these"; prediction -1)


def predict_with_processes(predict: dict, training: dict, model_dir: Path, records: pd.DataFrame) -> pd.DataFrame:
    """The records through the model folder: in this process, or sharded over one process per GPU (as the
    full evaluation is), rank 0 gathering the rows. `predict`, `training`: the parameter sections (the
    launch settings, progress bars and the launch folder are training's)."""
    settings, launch_settings = PredictConfig.from_section(predict), TrainConfig.from_section(training)
    world = world_size_for(settings.num_processes, settings.device)
    if not uses_launcher(launch_settings, world):
        loaded = load_model(model_dir, resolve_device_name(settings.device))
        return predict_records(loaded, records, top_k=settings.top_k, batch_size=settings.batch_size,
                               workers=settings.dataloader_num_workers, progress_mode=launch_settings.progress_bar,
                               calibrated=settings.calibrated, reject_below=settings.reject_below)
    launch = launch_settings.resolved_output_dir() / "launch_predict"
    _, frames = launch_processes(launch_settings, world, launch, {"predict": predict, "training": training},
                                 {"predict": records}, "food_multids.inference.worker",
                                 extra={"model_dir": str(model_dir)})
    return frames["predictions"]


def predict_records(loaded: LoadedModel, records: pd.DataFrame, *, top_k: int, batch_size: int, workers: int = 0,
                    progress_mode: str = "auto", calibrated: bool = True,
                    reject_below: float | str | dict | None = None) -> pd.DataFrame:
    """One prediction row per record (an input row predicted in several label spaces has one per space).
    `calibrated`: probabilities with the model's fitted temperatures; `reject_below` (predict.reject_below):
    a confidence under it makes the row "none of these" (prediction -1, name "unknown", top-k kept)."""
    # Before the loop: a bad setting fails at once.
    thresholds = reject_thresholds(loaded, reject_below, calibrated, set(records["dataset_name"]))
    out = run_model(loaded, records, batch_size=batch_size, top_k=top_k, workers=workers, desc="predict",
                    progress_mode=progress_mode, own_classes=True, calibrated=calibrated)
    return prediction_table(loaded, records, out.predictions, thresholds)


class PredictSettingError(ValueError):
    """predict.reject_below / predict.calibrated do not fit the model: the message says what to set."""


def reject_thresholds(loaded: LoadedModel, reject_below: float | str | dict | None, calibrated: bool = True,
                      wanted: set[str] | None = None) -> dict[str, float]:
    """predict.reject_below per label space: one value, a value per dataset, or `auto` (the model's
    thresholds fitted for evaluation.reject_precision on its calibration split, on calibrated
    confidences: refused with calibrated false). `wanted`: the label spaces the records use."""
    spaces = [name for name in loaded.label_spaces if wanted is None or name in wanted]
    if reject_below is None:
        return {}
    if isinstance(reject_below, dict):
        unknown = [name for name in reject_below if name not in loaded.label_spaces]
        if unknown:
            raise PredictSettingError(f"predict.reject_below (--reject-below) names {unknown}, which are not label "
                                      f"spaces of the model ({', '.join(loaded.label_spaces)})")
        return {name: float(value) for name, value in reject_below.items()}
    if reject_below == "auto":
        if not calibrated:
            raise PredictSettingError("predict.reject_below is auto, whose thresholds were fitted on calibrated "
                                      "confidences, but predict.calibrated is false (--uncalibrated): use one or give "
                                      "a threshold of your own")
        fitted = (loaded.model.meta.calibration or {}).get("auto_reject_below") or {}
        missing = [name for name in spaces if fitted.get(name) is None]
        if missing:
            raise PredictSettingError(f"predict.reject_below (--reject-below) is auto but the model has no fitted "
                                      f"threshold for {missing}: it was saved without calibration "
                                      "(evaluation.calibrate: true fits them at select_best), or that dataset had "
                                      "fewer than 2 calibration images; give a threshold instead")
        return {name: float(fitted[name]) for name in spaces}
    return dict.fromkeys(spaces, float(reject_below))


def predict_images(model: LoadedModel | Path | str, images: list[Path | str], dataset: str | None = None,
                   top_k: int = 5, batch_size: int = 8, device: str = "auto",
                   max_image_pixels: int = PredictConfig.max_image_pixels) -> pd.DataFrame:
    """Image files through a model folder (or a loaded model): the notebook's one call. Without
    `dataset`, each image is predicted in every label space the model knows."""
    from food_multids.inference.inputs import records_from_files

    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model), resolve_device_name(device))
    records, _ = records_from_files([], [Path(i) for i in images], dataset, loaded.label_spaces,
                                    max_image_pixels=max_image_pixels, pixels_setting="max_image_pixels")
    return predict_records(loaded, records, top_k=top_k, batch_size=batch_size, progress_mode="never")


def prediction_table(loaded: LoadedModel, records: pd.DataFrame, rows: dict[str, list],
                     thresholds: dict[str, float] | None = None) -> pd.DataFrame:
    """Join the loop's rows (by sample_id) with the records; records whose image failed to decode keep
    their row with prediction -1 and an `error`, so nothing is dropped without a trace. A row whose top
    confidence is below its label space's threshold is "none of these": prediction -1, name "unknown"."""
    thresholds = thresholds or {}
    by_id = {sid: i for i, sid in enumerate(rows["sample_id"])}
    names_of = {name: loaded.class_names(name) for name in loaded.label_spaces}
    table: dict[str, list] = {c: [] for c in PREDICTION_COLUMNS}
    for rec in records[["sample_id", "row", "image_ref", "dataset_name"]].itertuples(index=False):
        names = names_of[rec.dataset_name]
        i = by_id.get(rec.sample_id)
        if i is None:
            ids, probs, error = [], [], UNREADABLE
        else:
            keep = [j for j, c in enumerate(rows["topk"][i]) if c >= 0]  # slots past the dataset's classes
            ids = [int(rows["topk"][i][j]) for j in keep]
            probs = [float(rows["topk_prob"][i][j]) for j in keep]
            error = None
        labels = [names[c] if names and c < len(names) else str(c) for c in ids]  # no class names: the id as text
        table["row"].append(int(rec.row))
        table["image"].append(str(rec.image_ref))
        table["dataset_name"].append(str(rec.dataset_name))
        rejected = bool(probs) and probs[0] < thresholds.get(rec.dataset_name, -1.0)
        table["prediction"].append(-1 if rejected or not ids else ids[0])
        table["prediction_name"].append(UNKNOWN if rejected else labels[0] if labels else None)
        table["confidence"].append(probs[0] if probs else float("nan"))
        table["top_k_ids"].append(ids)
        table["top_k_names"].append(labels)
        table["top_k_probs"].append(probs)
        table["error"].append(error)
    frame = pd.DataFrame(table)
    frame["prediction"] = frame["prediction"].astype(np.int64)
    if thresholds:
        unknown = int((frame["prediction_name"] == UNKNOWN).sum())
        logger.info("%d of %d prediction(s) below predict.reject_below %s: 'unknown'", unknown, len(frame),
                    {k: round(v, 4) for k, v in thresholds.items()})
    failed = int(frame["error"].notna().sum())
    if failed:
        logger.warning("%d of %d image(s) could not be decoded: their rows have prediction -1 and an error",
                       failed, len(frame))
    return frame
