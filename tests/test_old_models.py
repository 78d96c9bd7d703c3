"""A served model registered before issue 28 re-homed the package still loads and predicts: its pickle names
food_multids.serving.ServedClassifier and food_multids.datasets.loaded_model.LoadedModelDataset, which
now live in food_multids.pipelines.predict.serving and food_multids.catalog (re-exported at the old paths).

tests/fixtures/served_model_2026_12_06 is a model logged by this project's `kedro run` on 2026-12-06
before the move (the MLflow model folder as written to mlartifacts: MLmodel, python_model.pkl, the tiny
demo classifier), kept byte for byte."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BIN, write_image

FIXTURE = Path(__file__).parent / "fixtures" / "served_model_2026_12_06"

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(pd.DataFrame({"image": [sys.argv[2]], "dataset_name": ["digits"]}))
print(json.dumps({"ids": answer["top_k_ids"].tolist()[0], "probs": answer["top_k_probs"].tolist()[0],
                  "classes": type(model.unwrap_python_model()).__module__}))
"""


@pytest.mark.slow
def test_a_model_registered_before_the_package_moved_still_loads_and_predicts(tmp_path):
    from food_multids.inference.inputs import records_from_files
    from food_multids.inference.model import load_model
    from food_multids.inference.predict import predict_records

    pickled = (FIXTURE / "python_model.pkl").read_bytes()
    assert b"food_multids.serving" in pickled and b"food_multids.datasets.loaded_model" in pickled  # the old paths
    image = write_image(tmp_path / "a.png", colour=(40, 180, 90))
    # A fresh interpreter, as `mlflow models serve` starts one: nothing of the new paths imported beforehand.
    proc = subprocess.run([str(BIN / "python"), "-c", LOAD_AND_PREDICT, str(FIXTURE),
                           base64.b64encode(image.read_bytes()).decode()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["classes"] == "food_multids.pipelines.predict.serving"  # the old path resolved to the moved class
    loaded = load_model(FIXTURE / "artifacts" / "best_model", torch.device("cpu"))
    records, _ = records_from_files([], [image], "digits", loaded.label_spaces)
    expected = predict_records(loaded, records, top_k=5, batch_size=1)  # no calibration in it: the raw softmax
    assert served["ids"] == list(expected["top_k_ids"].iloc[0])
    np.testing.assert_allclose(served["probs"], expected["top_k_probs"].iloc[0], atol=1e-6)
