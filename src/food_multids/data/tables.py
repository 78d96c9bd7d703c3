"""Merging, tagging, statistics and stratified evaluation subsets on record tables."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from food_multids.config import DatasetSpec

logger = logging.getLogger(__name__)


def tag_records(frame: pd.DataFrame, specs: tuple[DatasetSpec, ...], split: str, seed: int, shuffle: bool
                ) -> pd.DataFrame:
    """Add dataset_id, num_classes and a stable sample_id; shuffle with `seed` when asked."""
    names = [s.name for s in specs]
    codes = pd.Categorical(frame["dataset_name"].astype(str), categories=names).codes.astype(np.int16)
    num_classes = np.array([s.num_classes for s in specs], dtype=np.int32)
    out = frame.copy()
    out["dataset_name"] = pd.Categorical.from_codes(codes, categories=names)
    out["dataset_id"] = codes
    out["num_classes"] = num_classes[codes]
    # Stable across runs and machines: a hash of what identifies the sample, not its position.
    key = out["dataset_name"].astype(str) + "\x00" + out["image"].astype(str) + "\x00" + split
    out["sample_id"] = pd.util.hash_pandas_object(key, index=False).to_numpy().view(np.int64)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(out))
        out = out.iloc[order]
    return out.reset_index(drop=True)


def dataset_statistics(tables: dict[str, pd.DataFrame], specs: tuple[DatasetSpec, ...]) -> pd.DataFrame:
    """Per split and dataset: rows, share of the split, classes covered out of num_classes."""
    rows = []
    for split, frame in tables.items():
        total = len(frame)
        grouped = frame.groupby("dataset_name", observed=False)["label"]
        counts, classes = grouped.size(), grouped.nunique()
        for spec in specs:
            n = int(counts.get(spec.name, 0))
            rows.append({"split": split, "dataset_name": spec.name, "rows": n,
                         "share": n / total if total else 0.0,
                         "classes_covered": int(classes.get(spec.name, 0)), "num_classes": spec.num_classes})
    return pd.DataFrame(rows)


def format_statistics(stats: pd.DataFrame) -> str:
    header = f"{'split':<6} {'dataset':<20} {'rows':>10} {'share':>7} {'classes':>13}"
    lines = [header, "-" * len(header)]
    for r in stats.itertuples():
        lines.append(f"{r.split:<6} {r.dataset_name:<20} {r.rows:>10,} {r.share:>7.1%} "
                     f"{r.classes_covered:>6}/{r.num_classes:<6}")
    return "\n".join(lines)


def _class_quotas(counts: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """How many rows to take per class: proportional, every class at least one where target allows."""
    if target >= len(counts):
        exact = counts * (target / counts.sum())
        quota = np.maximum(np.floor(exact).astype(np.int64), 1)
        quota = np.minimum(quota, counts)
        remainder = exact - np.floor(exact)
        while quota.sum() < target:  # largest remainders first, then any class with rows left
            room = quota < counts
            pick = np.flatnonzero(room)[np.argmax(remainder[room] + rng.random(room.sum()) * 1e-9)]
            quota[pick] += 1
            remainder[pick] = -1
        while quota.sum() > target:  # the floor-at-one rule overshot: trim the largest classes
            pick = np.argmax(quota - (quota == 1) * counts.max())
            quota[pick] -= 1
        return quota
    quota = np.zeros(len(counts), dtype=np.int64)
    # Fewer rows than classes: one row each for `target` classes drawn with probability ~ class size.
    chosen = rng.choice(len(counts), size=target, replace=False, p=counts / counts.sum())
    quota[chosen] = 1
    return quota


def stratified_subset(frame: pd.DataFrame, specs: tuple[DatasetSpec, ...], seed: int,
                      ratio_override: float | None = None) -> pd.DataFrame:
    """Per dataset, eval_ratio of its rows, stratified by label, reproducible for a given seed."""
    parts = []
    for spec in specs:
        rng = np.random.default_rng([seed, spec.index])
        rows = frame[frame["dataset_name"] == spec.name]
        if rows.empty:
            continue
        ratio = spec.eval_ratio if ratio_override is None else ratio_override
        target = max(1, round(ratio * len(rows)))
        labels = rows["label"].to_numpy()
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        quota = _class_quotas(counts, target, rng)
        # Random rank of each row inside its class; keep the rows ranked below their class quota.
        order = rng.permutation(len(rows))
        rank = np.empty(len(rows), dtype=np.int64)
        sorted_idx = order[np.argsort(inverse[order], kind="stable")]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank[sorted_idx] = np.arange(len(rows)) - np.repeat(starts, counts)
        parts.append(rows.iloc[np.flatnonzero(rank < quota[inverse])])
    return pd.concat(parts, ignore_index=True) if parts else frame.iloc[:0]
