"""Data nodes: ingest_jsonl -> merge_and_tag -> split_eval_subsets."""

from __future__ import annotations

import logging

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.data.ingest import ingest
from food_multids.data.labels import resolve_label_names
from food_multids.data.tables import (
    count_overlap,
    dataset_statistics,
    format_statistics,
    stratified_subset,
    tag_records,
)

logger = logging.getLogger(__name__)


def ingest_jsonl(parameters: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Read and validate every configured JSONL file.

    Returns the train rows, the val rows, the rejected rows (split, file, line, reason, detail) and a
    per-file summary of kept and dropped rows.
    """
    cfg = ProjectConfig.from_params(parameters)
    result = ingest(cfg)
    return result.train, result.val, result.rejected, result.summary


def merge_and_tag(train_records: pd.DataFrame, val_records: pd.DataFrame, parameters: dict
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tag rows with dataset_id, num_classes and sample_id; shuffle train; compute the dataset mix."""
    cfg = ProjectConfig.from_params(parameters, check_files=False)
    seed, shuffle = cfg.training.seed, cfg.training.shuffle
    train = tag_records(train_records, cfg.datasets, "train", seed, shuffle)
    val = tag_records(val_records, cfg.datasets, "val", seed, shuffle=False)
    overlap = count_overlap(train_records, val_records)
    if overlap:
        logger.warning("%d image(s) appear in both the train and the val split of the same dataset", overlap)
    names = resolve_label_names(cfg, train_records, val_records)  # stops on a name/label mismatch
    known = [n for n, v in names.items() if v]
    if known:
        logger.info("Class names known for %s", known)
    stats = dataset_statistics({"train": train, "val": val}, cfg.datasets)
    logger.info("Dataset mix:\n%s", format_statistics(stats))
    return train, val, stats


def split_eval_subsets(val_set: pd.DataFrame, parameters: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per dataset, a stratified seeded eval_ratio subset for partial evaluation; and the full set."""
    cfg = ProjectConfig.from_params(parameters, check_files=False)
    subset = stratified_subset(val_set, cfg.datasets, cfg.training.seed)
    for spec in cfg.datasets:
        n_all = int((val_set["dataset_name"] == spec.name).sum())
        n_sub = int((subset["dataset_name"] == spec.name).sum())
        logger.info("Eval subset %s: %d of %d rows (eval_ratio %.3g)", spec.name, n_sub, n_all, spec.eval_ratio)
    return subset, val_set
