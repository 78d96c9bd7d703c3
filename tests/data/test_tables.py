from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from food_multids.config import DatasetSpec
from food_multids.data.tables import dataset_statistics, stratified_subset, tag_records

SPECS = (DatasetSpec(name="small", num_classes=10, eval_ratio=0.2, index=0),
         DatasetSpec(name="big", num_classes=200, eval_ratio=0.1, index=1))


def records(rng_seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    small = pd.DataFrame({"label": rng.integers(0, 10, 500), "dataset_name": "small"})
    # Long-tailed 200-class set: some classes have a single row.
    big_labels = np.concatenate([np.repeat(np.arange(200), 1), rng.zipf(1.5, 3000) % 200])
    big = pd.DataFrame({"label": big_labels, "dataset_name": "big"})
    frame = pd.concat([small, big], ignore_index=True)
    frame["image"] = [f"/img/{i}.png" for i in range(len(frame))]
    frame["file_index"] = (frame["dataset_name"] == "big").astype("int16")
    frame["line"] = frame.groupby("dataset_name").cumcount() + 1
    return tag_records(frame, SPECS, "val", seed=0, shuffle=False)


def test_subset_takes_eval_ratio_of_each_dataset():
    frame = records()
    subset = stratified_subset(frame, SPECS, seed=1)
    for spec in SPECS:
        n_all = (frame["dataset_name"] == spec.name).sum()
        n_sub = (subset["dataset_name"] == spec.name).sum()
        assert n_sub == round(spec.eval_ratio * n_all)


def test_subset_represents_every_class_where_possible():
    frame = records()
    subset = stratified_subset(frame, SPECS, seed=1)
    for spec in SPECS:
        assert set(subset.loc[subset["dataset_name"] == spec.name, "label"]) == \
            set(frame.loc[frame["dataset_name"] == spec.name, "label"])


def test_subset_is_proportional_to_class_sizes():
    frame = records()
    subset = stratified_subset(frame, SPECS, seed=3)
    small_all = frame[frame["dataset_name"] == "small"]["label"].value_counts()
    small_sub = subset[subset["dataset_name"] == "small"]["label"].value_counts()
    expected = small_all * 0.2
    assert (abs(small_sub.reindex(expected.index) - expected) <= 1).all()


def test_subset_is_reproducible_and_seed_dependent():
    frame = records()
    a = stratified_subset(frame, SPECS, seed=5)["sample_id"].tolist()
    b = stratified_subset(frame, SPECS, seed=5)["sample_id"].tolist()
    c = stratified_subset(frame, SPECS, seed=6)["sample_id"].tolist()
    assert a == b and sorted(a) != sorted(c)


def test_fewer_rows_than_classes_takes_one_per_class():
    frame = records()
    tiny_ratio = tuple(dataclasses.replace(s, eval_ratio=0.01) for s in SPECS)
    subset = stratified_subset(frame, tiny_ratio, seed=1)
    big = subset[subset["dataset_name"] == "big"]
    assert len(big) == round(0.01 * 3200) and big["label"].is_unique


def test_tagging_adds_ids_and_stable_sample_ids():
    frame = records()
    assert frame["dataset_id"].tolist()[:1] == [0] and frame["dataset_id"].iloc[-1] == 1
    assert set(frame["num_classes"]) == {10, 200}
    assert frame["sample_id"].is_unique
    again = tag_records(frame[["label", "dataset_name", "image", "file_index", "line"]].iloc[::-1], SPECS, "val",
                        seed=0, shuffle=True)
    assert dict(zip(frame["image"], frame["sample_id"], strict=True)) == \
        dict(zip(again["image"], again["sample_id"], strict=True))


def test_shuffle_is_seeded():
    frame = records()[["label", "dataset_name", "image", "file_index", "line"]]
    a = tag_records(frame, SPECS, "train", seed=1, shuffle=True)["image"].tolist()
    b = tag_records(frame, SPECS, "train", seed=1, shuffle=True)["image"].tolist()
    c = tag_records(frame, SPECS, "train", seed=2, shuffle=True)["image"].tolist()
    assert a == b != c and sorted(a) == sorted(c)


def test_statistics_count_share_and_classes():
    frame = records()
    stats = dataset_statistics({"val": frame}, SPECS).set_index("dataset_name")
    assert stats.loc["small", "rows"] == 500 and stats.loc["big", "rows"] == 3200
    assert stats.loc["small", "share"] == pytest.approx(500 / 3700)
    assert stats.loc["small", "classes_covered"] == 10 and stats.loc["big", "classes_covered"] == 200
    assert stats.loc["big", "num_classes"] == 200
