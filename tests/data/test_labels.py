from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from food_multids.config import ProjectConfig
from food_multids.data.labels import LabelNameError, resolve_label_names


def frame(rows):
    return pd.DataFrame(rows, columns=["dataset_name", "label", "label_name"])


def config(two_datasets, **alpha) -> ProjectConfig:
    params = copy.deepcopy(two_datasets)
    params["datasets"]["dataset_configs"]["alpha"].update(alpha)
    return ProjectConfig.from_params(params)


def test_names_come_from_rows_when_every_class_has_one(two_datasets):
    rows = frame([("alpha", 0, "apple"), ("alpha", 1, "pear"), ("alpha", 2, "fig"), ("beta", 0, "x")])
    names = resolve_label_names(config(two_datasets), rows)
    assert names == {"alpha": ["apple", "pear", "fig"], "beta": None}


@pytest.mark.parametrize("fmt", ["lines", "json"])
def test_names_come_from_a_class_names_file(two_datasets, tmp_path, fmt):
    path = tmp_path / "names.txt"
    path.write_text("apple\npear\nfig\n" if fmt == "lines" else json.dumps(["apple", "pear", "fig"]))
    names = resolve_label_names(config(two_datasets, class_names=str(path)), frame([("alpha", 1, "pear")]))
    assert names["alpha"] == ["apple", "pear", "fig"]


def test_rows_disagreeing_with_the_file_name_the_dataset_and_label(two_datasets, tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("apple\npear\nfig\n")
    with pytest.raises(LabelNameError,
                       match="dataset 'alpha', label 2: rows say label_name 'plum' but class_names file says 'fig'"):
        resolve_label_names(config(two_datasets, class_names=str(path)), frame([("alpha", 2, "plum")]))


def test_file_with_the_wrong_number_of_names(two_datasets, tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("apple\npear\n")
    with pytest.raises(LabelNameError, match="num_classes 3 but the file lists 2 class names"):
        resolve_label_names(config(two_datasets, class_names=str(path)))


def test_one_label_with_two_names_is_an_error(two_datasets):
    with pytest.raises(LabelNameError, match="dataset 'alpha', label 0: rows give different label_name values"):
        resolve_label_names(config(two_datasets), frame([("alpha", 0, "apple"), ("alpha", 0, "apples")]))
    with pytest.raises(LabelNameError, match="label 0: label_name 'b' in one split, 'a' in another"):
        resolve_label_names(config(two_datasets), frame([("alpha", 0, "a")]), frame([("alpha", 0, "b")]))
