"""Where a model to predict with comes from: a folder or an MLflow URI, and clear words when it is neither."""

from __future__ import annotations

import mlflow
import pytest

from food_multids.inference.source import local_model_dir


def test_an_unknown_registry_version_is_named_with_the_store_not_a_traceback(tmp_path):
    before = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        with pytest.raises(FileNotFoundError, match=rf"models:/food_multids/99 is not in the MLflow store {store}: "
                                                    r"Registered Model with name=food_multids not found"):
            local_model_dir("models:/food_multids/99")
    finally:
        mlflow.set_tracking_uri(before)


def test_a_folder_without_a_classifier_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a trained classifier folder \(no classifier.json\)"):
        local_model_dir(str(tmp_path))
