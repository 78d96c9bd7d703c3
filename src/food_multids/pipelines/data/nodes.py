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


def data_config(data: dict, datasets: dict, num_labels: int, *, check_files: bool = False, **training) -> ProjectConfig:
    """The config the data nodes work from, parsed from the sections they take (`params:data`,
    `params:datasets`, `params:model.num_labels`, a training setting or two): kedro-viz shows each node's real
    parameters. Everything else keeps its defaults; preflight has checked the whole config before any node."""
    return ProjectConfig.from_params({"data": data, "datasets": datasets, "model": {"num_labels": num_labels},
                                      "training": training}, check_files=check_files)


def ingest_jsonl(data: dict, datasets: dict, num_labels: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Read and validate every configured JSONL file.

    Returns the train rows, the val rows, the rejected rows (split, file, line, reason, detail) and a
    per-file summary of kept and dropped rows.
    """
    result = ingest(data_config(data, datasets, num_labels, check_files=True))
    return result.train, result.val, result.rejected, result.summary


def merge_and_tag(train_records: pd.DataFrame, val_records: pd.DataFrame, data: dict, datasets: dict,
                  num_labels: int, seed: int, shuffle: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tag rows with dataset_id, num_classes and sample_id; shuffle train; compute the dataset mix."""
    cfg = data_config(data, datasets, num_labels, seed=seed, shuffle=shuffle)
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


def split_eval_subsets(val_set: pd.DataFrame, data: dict, datasets: dict, num_labels: int, seed: int
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per dataset, a stratified seeded eval_ratio subset for partial evaluation; and the full set."""
    cfg = data_config(data, datasets, num_labels, seed=seed)
    subset = stratified_subset(val_set, cfg.datasets, seed)
    for spec in cfg.datasets:
        n_all = int((val_set["dataset_name"] == spec.name).sum())
        n_sub = int((subset["dataset_name"] == spec.name).sum())
        logger.info("Eval subset %s: %d of %d rows (eval_ratio %.3g)", spec.name, n_sub, n_all, spec.eval_ratio)
    return subset, val_set


def run_data_nodes(parameters: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The data pipeline's three nodes on a whole `parameters` dict, outside Kedro (scripts, notebooks, tests):
    (train_set, val_set, eval_subset, full_eval_set)."""
    sections = (parameters["data"], parameters.get("datasets") or {}, parameters["model"]["num_labels"])
    training = parameters.get("training") or {}
    seed, shuffle = training.get("seed", 42), training.get("shuffle", True)
    train, val, _, _ = ingest_jsonl(*sections)
    train_set, val_set, _ = merge_and_tag(train, val, *sections, seed, shuffle)
    subset, full = split_eval_subsets(val_set, *sections, seed)
    return train_set, val_set, subset, full
