"""Predictions for records: the shared inference loop's rows as a table of classes, names and
probabilities (a softmax over each image's own dataset's classes: the logits are masked)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from food_multids.inference.model import LoadedModel, load_model, run_model

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["row", "image", "dataset_name", "prediction", "prediction_name", "confidence",
                      "top_k_ids", "top_k_names", "top_k_probs", "error"]
UNREADABLE = "the image could not be decoded (see the log)"


def predict_records(loaded: LoadedModel, records: pd.DataFrame, *, top_k: int, batch_size: int, workers: int = 0,
                    progress_mode: str = "auto") -> pd.DataFrame:
    """One prediction row per record (an input row predicted in several label spaces has one per space)."""
    out = run_model(loaded, records, batch_size=batch_size, top_k=top_k, workers=workers, desc="predict",
                    progress_mode=progress_mode)
    return prediction_table(loaded, records, out.predictions)


def predict_images(model: LoadedModel | Path | str, images: list[Path | str], dataset: str | None = None,
                   top_k: int = 5, batch_size: int = 8) -> pd.DataFrame:
    """Image files through a model folder (or a loaded model): the notebook's one call. Without
    `dataset`, each image is predicted in every label space the model knows."""
    import torch

    from food_multids.inference.inputs import records_from_files

    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model), torch.device("cpu"))
    records, _ = records_from_files([], [Path(i) for i in images], dataset, loaded.label_spaces)
    return predict_records(loaded, records, top_k=top_k, batch_size=batch_size, progress_mode="never")


def prediction_table(loaded: LoadedModel, records: pd.DataFrame, rows: dict[str, list]) -> pd.DataFrame:
    """Join the loop's rows (by sample_id) with the records; records whose image failed to decode keep
    their row with prediction -1 and an `error`, so nothing is dropped without a trace."""
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
        labels = [names[c] if names and c < len(names) else None for c in ids]
        table["row"].append(int(rec.row))
        table["image"].append(str(rec.image_ref))
        table["dataset_name"].append(str(rec.dataset_name))
        table["prediction"].append(ids[0] if ids else -1)
        table["prediction_name"].append(labels[0] if labels else None)
        table["confidence"].append(probs[0] if probs else float("nan"))
        table["top_k_ids"].append(ids)
        table["top_k_names"].append(labels)
        table["top_k_probs"].append(probs)
        table["error"].append(error)
    frame = pd.DataFrame(table)
    frame["prediction"] = frame["prediction"].astype(np.int64)
    failed = int(frame["error"].notna().sum())
    if failed:
        logger.warning("%d of %d image(s) could not be decoded: their rows have prediction -1 and an error",
                       failed, len(frame))
    return frame
