"""ingest: read every configured JSONL file, validate each row, apply the bad-row policy."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from food_multids.config import ProjectConfig, default_dataset_for_file
from food_multids.data.records import (
    PROBLEM_COLUMNS,
    TOO_LARGE,
    RecordError,
    check_image_files,
    find_duplicates,
    format_problems,
    read_jsonl,
    to_frame,
    validate_file,
)

logger = logging.getLogger(__name__)


@dataclass
class IngestResult:
    train: pd.DataFrame
    val: pd.DataFrame
    rejected: pd.DataFrame  # one row per dropped input row: split, file, line, reason, detail
    summary: dict  # per split and file: rows read, kept, dropped by reason


def _read_one(path: Path, index: int, cfg: ProjectConfig, split: str):
    rows = read_jsonl(path)
    if rows.num_rows == 0 and not rows.parse_problems:
        raise RecordError(f"{path}: file is empty (no JSON rows); data.{split}_jsonl_list must point at a file of "
                          "records")
    default = default_dataset_for_file(path, cfg.dataset_names)
    table, problems = validate_file(rows, cfg.num_classes(), default, file_index=index)
    # Duplicate pre-check inside the file's own thread: one hash pass, in parallel with other files.
    unique = len(pc.unique(table.column("image"))) == table.num_rows
    column = table.column("dataset_name").combine_chunks()
    codes, known = column.indices.to_numpy(), column.dictionary.to_pylist()
    names = frozenset(known[c] for c in np.unique(codes))
    return table, problems, unique, names


def _may_have_duplicates(results) -> bool:
    """Files that are each duplicate-free and share no dataset cannot hold duplicates together."""
    seen: set = set()
    for _, _, unique, names in results:
        if not unique or seen & names:
            return True
        seen |= names
    return False


def _read_split(split: str, files: tuple[Path, ...], cfg: ProjectConfig) -> tuple[pa.Table, list[tuple]]:
    # pyarrow releases the GIL: files parse and validate side by side.
    with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:
        results = list(pool.map(lambda args: _read_one(*args, cfg, split), [(p, i) for i, p in enumerate(files)]))
    problems = [(split, str(path), line, reason, detail)
                for path, (_, file_problems, _, _) in zip(files, results, strict=True)
                for line, reason, detail in file_problems]
    table = pa.concat_tables([r[0] for r in results]).unify_dictionaries().combine_chunks()
    dup = find_duplicates(table) if _may_have_duplicates(results) else np.zeros(table.num_rows, dtype=bool)
    if dup.any():
        first: dict[tuple, str] = {}
        names, images = table.column("dataset_name").to_pylist(), table.column("image").to_pylist()
        files_, lines = table.column("source_file").to_pylist(), table.column("line").to_pylist()
        for i, key in enumerate(zip(names, images, strict=True)):
            if dup[i]:
                problems.append((split, files_[i], lines[i], "duplicate row",
                                 f"same dataset_name and image as {first[key]} ({images[i]})"))
            else:
                first.setdefault(key, f"{files_[i]}:{lines[i]}")
        table = table.filter(pa.array(~dup))
    if cfg.data.check_images and table.num_rows:
        found = check_image_files(table.column("image").to_pylist(), cfg.data.image_check_workers,
                                  f"checking {split} images", cfg.data.max_image_pixels)
        bad = np.array([f is not None for f in found])
        if bad.any():
            files_, lines = table.column("source_file").to_pylist(), table.column("line").to_pylist()
            images = table.column("image").to_pylist()
            for i in np.flatnonzero(bad):
                reason = ("missing image file" if found[i] == "image file not found"
                          else TOO_LARGE if found[i].startswith(TOO_LARGE) else "bad image file")
                problems.append((split, files_[i], lines[i], reason, f"{found[i]}: {images[i]}"))
            table = table.filter(pa.array(~bad))
    return table, problems


def _summarise(split: str, files: tuple[Path, ...], frame: pd.DataFrame, problems: pd.DataFrame) -> dict:
    out = {}
    kept = [0] * len(files)
    if len(frame):
        kept = np.bincount(frame["file_index"].to_numpy(dtype=np.int64), minlength=len(files))
    for index, path in enumerate(map(str, files)):
        mine = problems[(problems["split"] == split) & (problems["file"] == path)]
        out[path] = {"kept": int(kept[index]), "dropped": len(mine),
                     "dropped_by_reason": dict(Counter(mine["reason"]))}
    return out


def ingest(cfg: ProjectConfig) -> IngestResult:
    """Read and validate both splits; raise RecordError or drop bad rows per data.on_bad_rows."""
    train_table, train_problems = _read_split("train", cfg.data.train_files, cfg)
    val_table, val_problems = _read_split("val", cfg.data.val_files, cfg)
    train, val = to_frame(train_table), to_frame(val_table)
    rejected = pd.DataFrame(train_problems + val_problems, columns=PROBLEM_COLUMNS)
    if len(rejected) and cfg.data.on_bad_rows == "error":
        raise RecordError(format_problems(rejected, f"{len(rejected)} bad input row(s) (data.on_bad_rows=error; set "
                                                     "it to skip to drop them):"))
    summary = {"train": _summarise("train", cfg.data.train_files, train, rejected),
               "val": _summarise("val", cfg.data.val_files, val, rejected)}
    for split, files in summary.items():
        for path, info in files.items():
            if info["kept"] == 0:
                raise RecordError(f"{path}: no valid rows left ({info['dropped']} dropped: "
                                  f"{info['dropped_by_reason']})")
            if info["dropped"]:
                logger.warning("%s: dropped %d bad row(s) of the %s split: %s (see the rejected_rows dataset)",
                               path, info["dropped"], split, info["dropped_by_reason"])
    for split, frame in (("train", train), ("val", val)):
        missing = sorted(set(cfg.dataset_names) - set(pa.array(frame["dataset_name"]).unique().to_pylist()))
        if missing:
            raise RecordError(f"dataset(s) {missing} are in datasets.dataset_configs but have no {split} rows "
                              f"in data.{split}_jsonl_list: add their files or remove them from dataset_configs")
    logger.info("Ingested %d train and %d val rows (%d dropped)", len(train), len(val), len(rejected))
    return IngestResult(train, val, rejected, summary)
