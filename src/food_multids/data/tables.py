"""Merging, tagging, statistics and stratified evaluation subsets on record tables."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from food_multids.config import DatasetSpec
from food_multids.data.records import to_frame

SPLIT_CODES = {"train": 0, "val": 1}


def make_sample_ids(split: str, dataset_id: np.ndarray, file_index: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Stable int64 id: split, dataset, file position in its list and line, packed (decodable, no hashing)."""
    return ((np.int64(SPLIT_CODES[split]) << 62) | (dataset_id.astype(np.int64) << 46)
            | (file_index.astype(np.int64) << 36) | line.astype(np.int64))


def _threaded_take(table: pa.Table, order: np.ndarray) -> pa.Table:
    """Table.take in two halves on two threads (pyarrow releases the GIL; take is single-threaded)."""
    if table.num_rows < 100_000:
        return table.take(pa.array(order))
    half = len(order) // 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda o: table.take(pa.array(o)), (order[:half], order[half:])))
    return pa.concat_tables(parts)


def tag_records(frame: pd.DataFrame, specs: tuple[DatasetSpec, ...], split: str, seed: int, shuffle: bool
                ) -> pd.DataFrame:
    """Add dataset_id, num_classes and a stable sample_id; shuffle with `seed` when asked."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    names = pa.array([s.name for s in specs], type=pa.string())
    dataset_name = table.column("dataset_name").combine_chunks()
    if pa.types.is_dictionary(dataset_name.type):
        # Map the (few) dictionary entries, not the million rows.
        lookup = pc.index_in(dataset_name.dictionary.cast(pa.string()), value_set=names).to_numpy(zero_copy_only=False)
        codes = lookup[dataset_name.indices.to_numpy()].astype(np.int16)
    else:
        codes = pc.index_in(dataset_name.cast(pa.string()), value_set=names).to_numpy().astype(np.int16)
    num_classes = np.array([s.num_classes for s in specs], dtype=np.int32)
    file_index = table.column("file_index").to_numpy() if "file_index" in table.column_names else np.zeros(len(codes))
    line = table.column("line").to_numpy() if "line" in table.column_names else np.arange(len(codes))
    dictionary = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), names)
    table = table.set_column(table.column_names.index("dataset_name"), "dataset_name", dictionary)
    table = table.append_column("dataset_id", pa.array(codes))
    table = table.append_column("num_classes", pa.array(num_classes[codes]))
    table = table.append_column("sample_id", pa.array(make_sample_ids(split, codes, file_index, line)))
    if shuffle:
        table = _threaded_take(table, np.random.default_rng(seed).permutation(table.num_rows))
    return to_frame(table)


def dataset_statistics(tables: dict[str, pd.DataFrame], specs: tuple[DatasetSpec, ...]) -> pd.DataFrame:
    """Per split and dataset: rows, share of the split, classes covered out of num_classes, and the
    images of its smallest and largest class with their ratio (the imbalance training.loss can weight)."""
    rows = []
    for split, frame in tables.items():
        total = len(frame)
        ids = frame["dataset_id"].to_numpy(dtype=np.int64)
        labels = frame["label"].to_numpy(dtype=np.int64)
        counts = np.bincount(ids, minlength=len(specs))
        width = int(labels.max(initial=0)) + 1
        flat = np.bincount(ids * width + labels, minlength=len(specs) * width)  # O(rows)
        per_class = flat.reshape(len(specs), width)
        classes = (per_class > 0).sum(axis=1)
        for spec in specs:
            n = int(counts[spec.index])
            sizes = per_class[spec.index, :spec.num_classes]
            present = sizes[sizes > 0]
            rows.append({"split": split, "dataset_name": spec.name, "rows": n,
                         "share": n / total if total else 0.0,
                         "classes_covered": int(classes[spec.index]), "num_classes": spec.num_classes,
                         "min_class_rows": int(sizes.min()) if len(sizes) else 0,
                         "max_class_rows": int(sizes.max()) if len(sizes) else 0,
                         "imbalance": float(present.max() / present.min()) if len(present) else float("nan")})
    return pd.DataFrame(rows)


def format_statistics(stats: pd.DataFrame) -> str:
    header = f"{'split':<6} {'dataset':<20} {'rows':>10} {'share':>7} {'classes':>13} {'per class':>13} {'max/min':>8}"
    lines = [header, "-" * len(header)]
    for r in stats.itertuples():
        lines.append(f"{r.split:<6} {r.dataset_name:<20} {r.rows:>10,} {r.share:>7.1%} "
                     f"{r.classes_covered:>6}/{r.num_classes:<6} {f'{r.min_class_rows}-{r.max_class_rows}':>13} "
                     f"{r.imbalance:>8.1f}")
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


def stratified_subset(frame: pd.DataFrame, specs: tuple[DatasetSpec, ...], seed: int) -> pd.DataFrame:
    """Per dataset, eval_ratio of its rows, stratified by label, reproducible for a given seed."""
    parts = []
    for spec in specs:
        rng = np.random.default_rng([seed, spec.index])
        rows = frame[frame["dataset_name"] == spec.name]
        if rows.empty:
            continue
        target = max(1, round(spec.eval_ratio * len(rows)))
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


def partial_eval_subset(evaluation: int, strategy: str, fixed: pd.DataFrame, full: pd.DataFrame | None,
                        specs: tuple[DatasetSpec, ...], seed: int) -> pd.DataFrame:
    """The rows scored by partial evaluation number EVALUATION (0, 1, ...): the fixed subset, or with the
    `fresh` strategy a new stratified draw of the full validation set each time (seeded by the number, so
    a resumed run draws what it would have drawn)."""
    if strategy == "fresh" and full is not None:
        return stratified_subset(full, specs, seed + 1_000_003 * (evaluation + 1))
    return fixed


def count_overlap(train: pd.DataFrame, val: pd.DataFrame) -> int:
    """Images listed under the same dataset in both splits (a leak worth a warning)."""
    hits = pc.is_in(pa.array(train["image"]), value_set=pa.array(val["image"]))
    if not pc.any(hits).as_py():
        return 0
    both = train[np.asarray(hits)]
    pairs = set(zip(val["dataset_name"].astype(str), val["image"].astype(str), strict=True))
    keys = zip(both["dataset_name"].astype(str), both["image"].astype(str), strict=True)
    return sum(key in pairs for key in keys)
