"""ingest: read every configured JSONL file, validate each row, apply the bad-row policy."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from food_multids.config import ProjectConfig, default_dataset_for_file
from food_multids.data.records import (
    MAX_LISTED_PROBLEMS,
    PROBLEM_COLUMNS,
    RecordError,
    check_image_files,
    find_duplicates,
    read_jsonl,
    validate_file,
)

logger = logging.getLogger(__name__)


@dataclass
class IngestResult:
    train: pd.DataFrame
    val: pd.DataFrame
    rejected: pd.DataFrame  # one row per dropped input row: split, file, line, reason, detail
    summary: dict  # per split and file: rows read, kept, dropped by reason


def _read_split(split: str, files: tuple[Path, ...], cfg: ProjectConfig) -> tuple[pd.DataFrame, list[tuple]]:
    num_classes = cfg.num_classes()
    frames, problems = [], []
    for path in files:
        rows = read_jsonl(path)
        if rows.num_rows == 0 and not rows.parse_problems:
            raise RecordError(f"{path}: file is empty (no JSON rows); data.{split}_jsonl_list must point at a file of records")
        frame, file_problems = validate_file(rows, split, num_classes, default_dataset_for_file(path, cfg.dataset_names))
        frames.append(frame)
        problems.extend((split, str(path), line, reason, detail) for line, reason, detail in file_problems)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(frame):
        dup = find_duplicates(frame)
        if dup.any():
            first = frame.drop_duplicates(["dataset_name", "image"]).set_index(["dataset_name", "image"])
            for i in np.flatnonzero(dup):
                row = frame.iloc[i]
                origin = first.loc[(row["dataset_name"], row["image"])]
                problems.append((split, str(row["source_file"]), int(row["line"]), "duplicate row",
                                 f"same dataset_name and image as {origin['source_file']}:{origin['line']} ({row['image']})"))
            frame = frame.loc[~dup].reset_index(drop=True)
    if cfg.data.check_images and len(frame):
        found = check_image_files(frame["image"].tolist(), cfg.data.image_check_workers, f"checking {split} images")
        bad = np.array([f is not None for f in found])
        for i in np.flatnonzero(bad):
            row = frame.iloc[i]
            reason = "missing image file" if found[i] == "image file not found" else "bad image file"
            problems.append((split, str(row["source_file"]), int(row["line"]), reason, f"{found[i]}: {row['image']}"))
        frame = frame.loc[~bad].reset_index(drop=True)
    return frame, problems


def _summarise(split: str, files: tuple[Path, ...], frame: pd.DataFrame, problems: pd.DataFrame) -> dict:
    out = {}
    kept = frame["source_file"].astype(str).value_counts().to_dict() if len(frame) else {}
    for path in map(str, files):
        mine = problems[(problems["split"] == split) & (problems["file"] == path)]
        out[path] = {"kept": int(kept.get(path, 0)), "dropped": len(mine),
                     "dropped_by_reason": dict(Counter(mine["reason"]))}
    return out


def _format_problems(problems: pd.DataFrame) -> str:
    shown = problems.sort_values(["split", "file", "line"]).head(MAX_LISTED_PROBLEMS)
    lines = [f"{r.file}:{r.line}: {r.reason}: {r.detail}" for r in shown.itertuples()]
    more = len(problems) - len(shown)
    tail = [f"... and {more} more"] if more else []
    return "\n  ".join([f"{len(problems)} bad input row(s) (data.on_bad_rows=error; set it to skip to drop them):",
                        *lines, *tail])


def ingest(cfg: ProjectConfig) -> IngestResult:
    """Read and validate both splits; raise RecordError or drop bad rows per data.on_bad_rows."""
    train, train_problems = _read_split("train", cfg.data.train_files, cfg)
    val, val_problems = _read_split("val", cfg.data.val_files, cfg)
    rejected = pd.DataFrame(train_problems + val_problems, columns=PROBLEM_COLUMNS)
    if len(rejected) and cfg.data.on_bad_rows == "error":
        raise RecordError(_format_problems(rejected))
    summary = {"train": _summarise("train", cfg.data.train_files, train, rejected),
               "val": _summarise("val", cfg.data.val_files, val, rejected)}
    for split, files in summary.items():
        for path, info in files.items():
            if info["kept"] == 0:
                raise RecordError(f"{path}: no valid rows left ({info['dropped']} dropped: {info['dropped_by_reason']})")
            if info["dropped"]:
                logger.warning("%s: dropped %d bad row(s) of the %s split: %s (see the rejected_rows dataset)",
                               path, info["dropped"], split, info["dropped_by_reason"])
    for split, frame in (("train", train), ("val", val)):
        missing = sorted(set(cfg.dataset_names) - set(frame["dataset_name"].unique()))
        if missing:
            raise RecordError(f"dataset(s) {missing} are in datasets.dataset_configs but have no {split} rows "
                              f"in data.{split}_jsonl_list: add their files or remove them from dataset_configs")
    logger.info("Ingested %d train and %d val rows (%d dropped)", len(train), len(val), len(rejected))
    return IngestResult(train, val, rejected, summary)
