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

from food_multids.evaluation.calibration import write_calibration
from food_multids.inference.inputs import records_from_files
from food_multids.inference.model import load_model
from food_multids.inference.predict import predict_records
from food_multids.inference.source import local_model_dir
from food_multids.pipelines.predict.serving import log_and_register
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
    # A calibrated model (as select_best leaves it): the server must answer with the calibrated probabilities.
    write_calibration(classifier_dir, {"temperature": {"digits": 2.5, "shapes": 0.7},
                                       "auto_reject_below": {"digits": 0.2, "shapes": 0.2}, "seed": 0, "fraction": 0.3})
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
    raw = predict_records(loaded, records, top_k=5, batch_size=8, calibrated=False)
    assert not np.allclose(np.array(expected["top_k_probs"].tolist()), np.array(raw["top_k_probs"].tolist()))

    port = free_port()
    server = serve(store, "models:/food_multids/2", port, tmp_path / "server.log")
    try:
        good = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in images]  # no dataset: every space
        status, answer = post(port, good)
        assert status == 200, answer
        got = answer["predictions"]
        assert [(r["row"], r["dataset_name"]) for r in got] == list(zip(expected["row"], expected["dataset_name"],
                                                                        strict=True))
        assert [r["top_k_ids"] for r in got] == [list(ids) for ids in expected["top_k_ids"]]
        np.testing.assert_allclose([r["top_k_probs"] for r in got], np.array(expected["top_k_probs"].tolist()),
                                   atol=1e-6)
        assert got[1]["dataset_name"] == "shapes" and got[0]["top_k_names"] == [str(i) for i in got[0]["top_k_ids"]]

        for kind, (image, dataset, message) in BAD.items():  # the model was logged with a 1 M pixel cap
            status, answer = post(port, [{"image": image, "dataset_name": dataset}, good[0]])
            assert 400 <= status < 500, (kind, status, answer)
            assert message in answer["message"], (kind, answer["message"])
        status, answer = post(port, [{"dataset_name": "digits"}])  # no image field at all: the schema says so
        assert status == 400 and "image" in answer["message"]
        # A client that sends its request and hangs up before the answer does not hold up the others.
        import socket

        body = json.dumps({"dataframe_records": good}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as gone:
            gone.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answers = concurrently([lambda i=i: post(port, [good[i % len(good)]]) for i in range(8)])
        for i, (status, answer) in enumerate(answers):  # concurrent single-image requests, batched together
            assert status == 200, answer
            assert answer["predictions"][0]["top_k_ids"] == got[(i % len(good)) * 2]["top_k_ids"]
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

    from food_multids.pipelines.register.nodes import log_served_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = MlflowClient().create_experiment("x")
    with mlflow.start_run(experiment_id=experiment):
        got = log_served_model(classifier_dir, pd.DataFrame({"image": [str(tmp_path / "gone.png")],
                                                             "dataset_name": ["digits"]}), PREDICT)
    assert got["logged"] is False and "gone.png" in got["error"]
    assert "The served model was not logged or registered" in caplog.text


# -- micro-batching, in process: the real served model loaded through MLflow, called from threads ----------------

def load_served(classifier_dir, folder: Path, **settings):
    """The served model saved and loaded as `mlflow models serve` loads it: (pyfunc model, ServedClassifier)."""
    from kedro.io import DataCatalog, MemoryDataset

    from food_multids.catalog import LoadedModelDataset
    from food_multids.pipelines.predict.pipeline import create_serving_pipeline
    from food_multids.pipelines.predict.serving import INPUT_NAME, ServedClassifier, signature

    predict = {**PREDICT, "serve_max_batch": 16, "serve_max_wait_ms": 5.0, "serve_max_queue": 256, **settings}
    catalog = DataCatalog({"best_model": LoadedModelDataset(str(classifier_dir), "cpu"),
                           "params:predict": MemoryDataset(predict)})
    served = ServedClassifier(create_serving_pipeline(), catalog, input_name=INPUT_NAME)
    folder.mkdir(parents=True)
    mlflow.pyfunc.save_model(folder / "model", python_model=served, signature=signature(), pip_requirements=[],
                             artifacts=served.extract_pipeline_artifacts(folder))
    model = mlflow.pyfunc.load_model(str(folder / "model"))
    return model, model.unwrap_python_model()


def request(*images: Path, dataset: str | None = "digits"):
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images],
                         "dataset_name": [dataset] * len(images)})


def concurrently(calls):
    """Run the callables at once, one thread each; their results (or exceptions) in order."""
    import threading

    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def images_for(tmp_path: Path, n: int) -> list[Path]:
    return [write_image(tmp_path / f"img/{i}.png",
                        colour=(7 * i % 256, 255 - 5 * i % 256, 40 + 3 * i)) for i in range(n)]


def test_concurrent_requests_share_one_forward_pass_with_the_answers_they_get_alone(classifier_dir, tmp_path):
    images = images_for(tmp_path, 2)
    # A long wait and a batch of 2: both requests are certainly in the first batch.
    model, served = load_served(classifier_dir, tmp_path / "served", serve_max_batch=2, serve_max_wait_ms=10_000.0)
    together = concurrently([lambda p=p: model.predict(request(p)) for p in images])
    assert served._batcher.batches == 1
    alone_model, alone = load_served(classifier_dir, tmp_path / "alone", serve_batching=False)
    for image, got in zip(images, together, strict=True):
        expected = alone_model.predict(request(image))
        assert got["top_k_ids"].tolist() == expected["top_k_ids"].tolist() and got["row"].tolist() == [0]
        np.testing.assert_allclose(np.stack(got["top_k_probs"]), np.stack(expected["top_k_probs"]), atol=1e-6)
    assert alone._batcher is None


def test_a_bad_request_fails_alone_and_order_is_kept_for_32_concurrent_requests(classifier_dir, tmp_path):
    from mlflow.exceptions import MlflowException

    images = images_for(tmp_path, 32)
    model, served = load_served(classifier_dir, tmp_path / "served", serve_max_batch=8, serve_max_wait_ms=20.0)
    alone = {p: model.predict(request(p)) for p in images[:4]}
    batches = served._batcher.batches
    # 32 requests: one of 3 images, one with a broken row, the rest single images.
    bad = request(images[0]).assign(image=["bm90IGFuIGltYWdl"])
    calls = [lambda: model.predict(request(*images[:3])), lambda: model.predict(bad)]
    calls += [lambda p=p: model.predict(request(p)) for p in images[2:]]
    results = concurrently(calls)
    assert isinstance(results[1], MlflowException) and results[1].get_http_status_code() == 400
    assert "row 0" in results[1].message
    three = results[0]
    assert three["row"].tolist() == [0, 1, 2]
    assert three["top_k_ids"].tolist() == [alone[p]["top_k_ids"].iloc[0] for p in images[:3]]
    for image, got in zip(images[2:], results[2:], strict=True):
        assert not isinstance(got, Exception), got
        assert got["row"].tolist() == [0] and got["image"].iloc[0].startswith("sha256:")
        if image in alone:
            assert got["top_k_ids"].tolist() == alone[image]["top_k_ids"].tolist()
    assert served._batcher.batches - batches < 31  # shared forward passes (33 images, batches of 8)


def test_a_full_queue_answers_503_and_the_waiting_requests_still_finish(classifier_dir, tmp_path):
    import threading

    from mlflow.exceptions import MlflowException

    from food_multids.inference.batching import MicroBatcher

    images = images_for(tmp_path, 3)
    model, served = load_served(classifier_dir, tmp_path / "served")
    release, running = threading.Event(), threading.Event()

    def slow_batch(records):  # the real forward pass, held until the queue has filled
        running.set()
        release.wait(60)
        return served._predict_batch(records)

    served._batcher = MicroBatcher(slow_batch, max_batch=1, max_wait_s=0.0, max_queue=1)
    first = threading.Thread(target=lambda: results.append(model.predict(request(images[0]))))
    results: list = []
    first.start()
    assert running.wait(60)  # the first request is in its forward pass
    second = threading.Thread(target=lambda: results.append(model.predict(request(images[1]))))
    second.start()
    deadline = time.time() + 30
    while served._batcher.pending() < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(MlflowException,
                       match=r"the server is busy: 1 images are queued .*serve_max_queue 1") as refused:
        model.predict(request(images[2]))
    assert refused.value.get_http_status_code() == 503
    release.set()
    first.join(60)
    second.join(60)
    assert len(results) == 2 and all(r["row"].tolist() == [0] for r in results)


def test_a_request_larger_than_a_batch_is_split_and_comes_back_in_order():
    import pandas as pd

    from food_multids.inference.batching import MicroBatcher

    seen = []

    def echo(records):
        seen.append(len(records))
        assert records["sample_id"].tolist() == list(range(len(records)))  # unique within the batch
        return records[["row", "image_ref"]]

    batcher = MicroBatcher(echo, max_batch=2, max_wait_s=0.0, max_queue=100)
    records = pd.DataFrame({"row": range(5), "image_ref": list("abcde"), "sample_id": range(5)})
    got = batcher.submit(records)
    assert got["image_ref"].tolist() == list("abcde") and seen == [2, 2, 1] and batcher.batches == 3


def test_a_server_may_change_the_batching_settings_through_the_environment(monkeypatch):
    from food_multids.pipelines.predict.serving import serving_settings

    assert serving_settings(PREDICT).serve_batching is True  # the registered settings (defaults here)
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_MAX_BATCH", "64")
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_BATCHING", "false")
    got = serving_settings({**PREDICT, "serve_max_batch": 8})
    assert got.serve_max_batch == 64 and got.serve_batching is False and got.top_k == PREDICT["top_k"]
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_MAX_QUEUE", "4")
    with pytest.raises(ValueError, match=r"FOOD_MULTIDS_SERVE_MAX_QUEUE=4.*serve_max_queue must be >= "
                                         r"predict.serve_max_batch \(64\), got 4"):
        serving_settings(PREDICT)
    monkeypatch.delenv("FOOD_MULTIDS_SERVE_MAX_QUEUE")
    # A threshold chosen after registration, from the report's coverage curve: no new training run.
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_REJECT_BELOW", "0.7")
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_CALIBRATED", "false")
    got = serving_settings(PREDICT)
    assert got.reject_below == 0.7 and got.calibrated is False
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_MAX_QUEUE", "[1")
    with pytest.raises(ValueError, match=r"FOOD_MULTIDS_SERVE_MAX_QUEUE='\[1' is not a value"):
        serving_settings(PREDICT)


def test_a_failed_batch_fails_its_requests_whole_and_leaves_nothing_behind():
    import pandas as pd

    from food_multids.inference.batching import MicroBatcher

    def run(records):
        if (records["row"] < 0).any():
            raise MemoryError("out of memory in the forward pass")
        return records[["row"]]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.0, max_queue=10)
    poisoned = pd.DataFrame({"row": [-1] * 10, "sample_id": range(10)})  # three batches' worth
    with pytest.raises(MemoryError):
        batcher.submit(poisoned)
    assert batcher.pending() == 0  # the split request's unsent part left with it
    # Several requests in one failing batch all get its error; none is left waiting.
    results = concurrently([lambda: batcher.submit(pd.DataFrame({"row": [-1], "sample_id": [0]})) for _ in range(3)])
    assert all(isinstance(r, MemoryError) for r in results) and batcher.pending() == 0
    good = batcher.submit(pd.DataFrame({"row": [0, 1, 2, 3, 4], "sample_id": range(5)}))
    assert good["row"].tolist() == [0, 1, 2, 3, 4]  # an idle server takes the next request, which succeeds


def test_the_environment_batch_size_reaches_the_forward_pass(classifier_dir, tmp_path, monkeypatch):
    from food_multids.pipelines.predict import nodes

    seen = []
    real = nodes.predict_records

    def spy(loaded, records, **kwargs):
        seen.append(kwargs["batch_size"])
        return real(loaded, records, **kwargs)

    monkeypatch.setattr(nodes, "predict_records", spy)
    monkeypatch.setenv("FOOD_MULTIDS_SERVE_MAX_BATCH", "64")
    model, served = load_served(classifier_dir, tmp_path / "served", serve_max_batch=8, batch_size=8)
    model.predict(request(*images_for(tmp_path, 2)))
    assert served._batcher.max_batch == 64 and seen == [64]


def test_each_env_registers_its_own_tagged_name_and_a_task_switch_is_warned(classifier_dir, tmp_path, caplog):
    import shutil

    from food_multids.console import describe_model
    from food_multids.framework.run_context import set_run_env
    from food_multids.model.classifier import CLASSIFIER_FILE
    from food_multids.pipelines.predict.serving import registered_name, tag_final_accuracy

    assert registered_name({"registered_model_name": None}, "local")[0] == "food_multids"
    assert registered_name({"registered_model_name": None}, "base")[0] == "food_multids"
    assert registered_name({"registered_model_name": "mine_v2"}, "mine") == ("mine_v2", "predict.registered_model_name")
    other = tmp_path / "other_task"  # the same weights, other label spaces: another task
    shutil.copytree(classifier_dir, other)
    (other / CLASSIFIER_FILE).write_text((classifier_dir / CLASSIFIER_FILE).read_text().replace('"shapes"', '"fruit"'))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment = MlflowClient(store).create_experiment("tasks")
    image = write_image(tmp_path / "a.png", colour=(30, 200, 90))
    params = {**PREDICT, "device": "cpu", "registered_model_name": None}
    set_run_env("mine")
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mine = log_and_register(classifier_dir, params, (str(image), "digits"))
        with mlflow.start_run(experiment_id=experiment):  # a second task pointed at the same explicit name
            mlflow.log_metric("final_eval_overall_accuracy", 0.75)  # full_evaluate ran before the registration
            log_and_register(classifier_dir, {**params, "registered_model_name": "shared"}, (str(image), "digits"))
            caplog.clear()
            log_and_register(other, {**params, "registered_model_name": "shared"}, (str(image), "digits"))
    finally:
        set_run_env(None)
    assert mine["registry_uri"] == "models:/food_multids-mine/1" and "'mine' env's own name" in mine["name_from"]
    client = MlflowClient(store)
    version = client.get_model_version("food_multids-mine", "1")
    assert version.tags["food_multids.datasets"] == "digits:10,shapes:40" and version.tags["food_multids.env"] == "mine"
    assert "digits (10 classes), shapes (40 classes)" in version.description and "'mine'" in version.description
    assert ("the registered model 'shared' version 1 serves the label spaces digits:10,shapes:40; this model's are "
            "digits:10,fruit:40") in caplog.text
    assert client.get_model_version("shared", "1").tags["food_multids.final_overall_accuracy"] == "0.7500"
    assert tag_final_accuracy(run.info.run_id, {"overall_accuracy": 0.8125}) == ["models:/food_multids-mine/1"]
    assert client.get_model_version("food_multids-mine", "1").tags["food_multids.final_overall_accuracy"] == "0.8125"
    described = describe_model("models:/food_multids-mine/latest", tmp_path)
    assert "label spaces: digits (10 classes), shapes (40 classes)" in described
    assert "registered model 'food_multids-mine' version 1 of 1, final overall accuracy 0.8125" in described
