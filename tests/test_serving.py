"""The served model: logged and registered from a run, served by a real `mlflow models serve` process on
127.0.0.1, answering base64 requests as the in-process predict does and refusing bad rows with a 4xx
while it keeps serving."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from food_multids.inference.inputs import records_from_files
from food_multids.inference.model import load_model
from food_multids.inference.predict import predict_records
from food_multids.inference.source import local_model_dir
from food_multids.serving import log_and_register
from tests.conftest import BIN, free_port, write_image
from tests.inference.test_inputs import BAD
from tests.pipelines.predict.test_pipeline import PREDICT


def post(port: int, records: list[dict]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def serve(store: str, model_uri: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError(f"the server did not answer /ping in 180 s:\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
def test_the_registered_model_is_served_and_survives_bad_requests(classifier_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment = MlflowClient(store).create_experiment("served")  # not set_experiment: it outlives the test
    images = [write_image(tmp_path / f"img/{i}.png", colour=(30 * i, 200 - 20 * i, 90)) for i in range(4)]
    for _ in range(2):  # two training runs: two registry versions
        with mlflow.start_run(experiment_id=experiment):
            registered = log_and_register(classifier_dir, {**PREDICT, "device": "cpu", "max_image_pixels": 1_000_000},
                                          (str(images[0]), "digits"))
    assert registered["registry_uri"] == "models:/food_multids/2"
    versions = MlflowClient(store).search_model_versions("name='food_multids'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert (local_model_dir("models:/food_multids/1") / "classifier.json").is_file()

    # In process, the same images: the reference answer.
    loaded = load_model(classifier_dir, torch.device("cpu"))
    records, _ = records_from_files([], images, None, loaded.label_spaces)
    expected = predict_records(loaded, records, top_k=5, batch_size=8)

    port = free_port()
    server = serve(store, "models:/food_multids/2", port, tmp_path / "server.log")
    try:
        good = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in images]  # no dataset: every space
        status, answer = post(port, good)
        assert status == 200, answer
        got = answer["predictions"]
        assert [(r["row"], r["dataset_name"]) for r in got] == list(zip(expected["row"], expected["dataset_name"], strict=True))
        assert [r["top_k_ids"] for r in got] == [list(ids) for ids in expected["top_k_ids"]]
        np.testing.assert_allclose([r["top_k_probs"] for r in got], np.array(expected["top_k_probs"].tolist()), atol=1e-6)
        assert got[1]["dataset_name"] == "shapes" and got[0]["top_k_names"] == [str(i) for i in got[0]["top_k_ids"]]

        for kind, (image, dataset, message) in BAD.items():  # the model was logged with a 1 M pixel cap
            status, answer = post(port, [{"image": image, "dataset_name": dataset}, good[0]])
            assert 400 <= status < 500, (kind, status, answer)
            assert message in answer["message"], (kind, answer["message"])
        status, answer = post(port, [{"dataset_name": "digits"}])  # no image field at all: the schema says so
        assert status == 400 and "image" in answer["message"]
        status, answer = post(port, [])  # an empty request: our words, not the schema's
        assert status == 400 and "the request has no rows" in answer["message"], answer
        status, answer = post(port, good[:1])  # still serving
        assert status == 200 and answer["predictions"][0]["top_k_ids"] == got[0]["top_k_ids"]
        log = (tmp_path / "server.log").read_text()
        assert "ERROR kedro" not in log and "Repeat the previous command" not in log  # the client's fault
        assert log.count("bad request (HTTP 400): ") >= len(BAD)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_failure_to_log_the_served_model_does_not_fail_the_finished_training(classifier_dir, tmp_path, caplog):
    import pandas as pd

    from food_multids.pipelines.predict.nodes import log_served_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment("x")
    with mlflow.start_run(experiment_id=experiment):
        got = log_served_model(classifier_dir, pd.DataFrame({"image": [str(tmp_path / "gone.png")],
                                                             "dataset_name": ["digits"]}), PREDICT)
    assert got["logged"] is False and "gone.png" in got["error"]
    assert "The served model was not logged or registered" in caplog.text
