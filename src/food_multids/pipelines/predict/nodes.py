"""predict nodes: ingest_images -> predict (files), decode_request -> predict_request (served requests)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from food_multids.config import PredictConfig
from food_multids.config.paths import resolve_path
from food_multids.inference.inputs import BadRequest, list_images, records_from_files, records_from_request
from food_multids.inference.model import LoadedModel
from food_multids.inference.predict import predict_records, predict_with_processes
from food_multids.model.classifier import label_spaces_of

logger = logging.getLogger(__name__)


def ingest_images(best_model: Path, predict: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records to predict from predict.jsonl_list and/or predict.image_dir, checked like training rows,
    in the label spaces of the model (read from its classifier.json); and the rejected rows."""
    cfg = PredictConfig.from_section(predict)
    images = list_images(resolve_path(cfg.image_dir)) if cfg.image_dir else []
    if cfg.image_dir and not images:
        logger.warning("predict.image_dir %s holds no image files", resolve_path(cfg.image_dir))
    records, rejected = records_from_files([resolve_path(p) for p in cfg.jsonl_list], images, cfg.dataset_name,
                                           label_spaces_of(Path(best_model)), on_bad_rows=cfg.on_bad_rows,
                                           max_image_pixels=cfg.max_image_pixels)
    if len(rejected):
        logger.warning("Skipped %d bad row(s) (predict.on_bad_rows=skip; see predict_rejected_rows)", len(rejected))
    logger.info("%d image(s) to predict (%d record(s) over the label spaces)", records["row"].nunique(), len(records))
    return records, rejected


def predict(best_model: Path, predict_records: pd.DataFrame, predict: dict, training: dict) -> pd.DataFrame:
    """Top-k classes, names and probabilities per record (one process per GPU when there are several, launched
    with training's settings: nodes, port, progress bars, the launch folder under its output_dir)."""
    return predict_with_processes(predict, training, Path(best_model), predict_records)


def predict_request(best_model: LoadedModel, served_records: pd.DataFrame, predict: dict) -> pd.DataFrame:
    """The served model's predict step: the same loop, on the model it loaded when the server started, for
    one request's records or for several requests' batched together (rows in record order; the served
    model refuses each request with a failed row: `refuse_failed_rows`)."""
    cfg = PredictConfig.from_section(predict)
    return predict_records(best_model, served_records, top_k=cfg.top_k,
                           batch_size=max(cfg.batch_size, cfg.serve_max_batch), progress_mode="never",
                           calibrated=cfg.calibrated, reject_below=cfg.reject_below)


def refuse_failed_rows(table: pd.DataFrame) -> pd.DataFrame:
    """A request's prediction rows, or BadRequest if any could not be predicted (decoded when the request
    came in, so unexpected: still the request's image, never a 200)."""
    failed = table[table["error"].notna()]
    if len(failed):
        raise BadRequest("\n".join([f"{len(failed)} row(s) could not be predicted; nothing was predicted:",
                                    *(f"row {r.row}: {r.error}" for r in failed.itertuples())]))
    return table


def decode_request(serving_request: pd.DataFrame, best_model: LoadedModel, predict: dict) -> pd.DataFrame:
    """A served request's rows (base64 images, dataset names) -> records; any bad row fails the request."""
    cfg = PredictConfig.from_section(predict)
    return records_from_request(serving_request, best_model.label_spaces, cfg.max_image_pixels, cfg.max_request_pixels)
