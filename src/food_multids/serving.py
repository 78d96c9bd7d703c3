"""The served model: the serving pipeline (decode_request -> predict) with a training run's best model,
logged as an MLflow pyfunc model through kedro-mlflow's KedroPipelineModel and registered, so that
`mlflow models serve -m models:/food_multids/<version>` answers HTTP requests.

Why not pipeline_ml_factory: it logs each inference input's catalog `filepath`, which for the
versioned `best_model` is the folder of every version; here the artifact is the one version this run
saved.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
import threading
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kedro.io import DataCatalog, MemoryDataset

from food_multids.config import ConfigError, PredictConfig
from food_multids.datasets import LoadedModelDataset
from food_multids.inference.batching import MicroBatcher, QueueFull
from food_multids.inference.inputs import BadRequest

# mlflow asks every PythonModel subclass, on definition, for type hints to infer a signature from; this
# one logs an explicit signature.
# (Recorded and dropped: importing kedro_mlflow puts its own filters in front of any filter set here.)
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    from kedro_mlflow.mlflow import KedroPipelineModel

    class ServedClassifier(KedroPipelineModel):
        """KedroPipelineModel whose bad input is the client's fault (an HTTP 400 naming each bad row), and
        whose concurrent requests share forward passes.

        MLflow's server runs each request in a thread. The serving pipeline's nodes run per request
        (decode_request in the request's own thread, so images decode side by side), and predict_request
        runs once per micro-batch of the records of every request waiting (`inference.batching`:
        predict.serve_max_batch images, predict.serve_max_wait_ms to gather, predict.serve_max_queue before
        HTTP 503). With predict.serve_batching false the requests take turns, one forward each. Both call
        the nodes directly on the model loaded at start: KedroPipelineModel.predict deep-copies its catalog,
        the loaded model included, on every request."""

        def load_context(self, context) -> None:
            super().load_context(context)
            self._turns = _Turns()
            registered = self.loaded_catalog.load("params:predict")
            settings = serving_settings(registered)
            # The nodes read the settings too (predict_request's forward batch): the same, overrides included.
            self._predict_params = {**registered, **{k: getattr(settings, k) for k in SERVE_OVERRIDES.values()}}
            self._batcher = MicroBatcher(self._predict_batch, settings.serve_max_batch,
                                         settings.serve_max_wait_ms / 1000, settings.serve_max_queue) \
                if settings.serve_batching else None

        def _node(self, name: str, inputs: dict) -> object:
            node = next(n for n in self.pipeline.nodes if n.name == name)
            given = {"params:predict": self._predict_params, **inputs}
            shared = {key: self.loaded_catalog.load(key) for key in node.inputs if key not in given}
            [output] = node.run({**shared, **{k: v for k, v in given.items() if k in node.inputs}}).values()
            return output

        def _predict_batch(self, records):
            return self._node("predict_request", {"served_records": records})

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

            from food_multids.pipelines.predict.nodes import refuse_failed_rows

            if not hasattr(self, "_turns"):  # not loaded through MLflow (load_context)
                self.load_context(context)
            try:
                # Kedro logs every request's nodes (INFO) and a failed node as an ERROR with "repeat the
                # previous command" hints: a bad request is the client's problem, said once below.
                with _quiet("kedro"):
                    records = self._node("decode_request", {INPUT_NAME: model_input})
                    if self._batcher is not None:
                        return refuse_failed_rows(self._batcher.submit(records))
                    with self._turns:
                        return refuse_failed_rows(self._predict_batch(records))
            except QueueFull as exc:
                logger.warning("busy (HTTP 503): %s", exc)
                raise MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE) from None
            except Exception as exc:
                cause = exc
                while cause is not None and not isinstance(cause, BadRequest):
                    cause = cause.__cause__ or cause.__context__
                if cause is None:
                    logger.exception("the served model failed on a request")
                    raise
                logger.warning("bad request (HTTP 400): %s", str(cause).splitlines()[0])
                raise MlflowException(str(cause), error_code=INVALID_PARAMETER_VALUE) from None

        def __getstate__(self) -> dict:
            # Locks are not pickled; load_context makes them anew.
            return {k: v for k, v in self.__dict__.items() if k not in ("_turns", "_batcher", "_predict_params")}

for _w in _caught:
    if "Add type hints to the `predict` method" not in str(_w.message):
        warnings.warn_explicit(_w.message, _w.category, _w.filename, _w.lineno)

logger = logging.getLogger(__name__)

INPUT_NAME = "serving_request"
MODEL_NAME = "model"  # the logged model's name inside its run
REQUIREMENTS = ("torch", "transformers", "pillow", "pandas", "pyarrow", "safetensors", "kedro", "kedro-datasets",
                "kedro-mlflow", "mlflow")


# Serving settings a server may change without registering a new model
# (`make serve FOOD_MULTIDS_SERVE_MAX_BATCH=64`).
SERVE_OVERRIDES = {f"FOOD_MULTIDS_{key.upper()}": key
                   for key in ("serve_batching", "serve_max_batch", "serve_max_wait_ms", "serve_max_queue")}


def serving_settings(predict: dict) -> PredictConfig:
    """The registered model's predict settings, with the FOOD_MULTIDS_SERVE_* environment variables on top."""
    import yaml

    overrides = {}
    for var, key in SERVE_OVERRIDES.items():
        if var in os.environ:
            try:
                overrides[key] = yaml.safe_load(os.environ[var])
            except yaml.YAMLError as exc:
                raise ValueError(f"{var}={os.environ[var]!r} is not a value ({exc.problem})") from None
    if not overrides:
        return PredictConfig.from_section(predict)
    logger.info("Serving settings from the environment: %s", overrides)
    try:
        return PredictConfig.from_section({**predict, **overrides})
    except ConfigError as exc:
        named = ", ".join(f"{var}={os.environ[var]}" for var, key in SERVE_OVERRIDES.items() if key in overrides)
        raise ValueError(f"the serving settings from the environment ({named}) are not valid: "
                         + "; ".join(exc.problems)) from None


class _Turns:
    """A lock granted in arrival order (threading.Lock is not fair: a request could wait for ever)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


@contextlib.contextmanager
def _quiet(name: str):
    """Hold the logger NAME at CRITICAL for the block (its one caller: a served request)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    # image is optional to the schema so that an empty request reaches records_from_request, which says
    # "the request has no rows" (MLflow would say "missing inputs ['image']").
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "dataset_name", required=False)])
    outputs = Schema([ColSpec("long", "row"), ColSpec("string", "image"), ColSpec("string", "dataset_name"),
                      ColSpec("long", "prediction"), ColSpec("string", "prediction_name", required=False),
                      ColSpec("double", "confidence"), ColSpec(Array("long"), "top_k_ids"),
                      ColSpec(Array("string"), "top_k_names", required=False), ColSpec(Array("double"), "top_k_probs"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return found


def log_and_register(model_dir: Path, predict_params: dict, example: tuple[str, str]) -> dict:
    """Log the serving pipeline + `model_dir` in the active MLflow run; register it under
    predict.registered_model_name. `example`: (an image file, its dataset) for the input example."""
    import mlflow
    import pandas as pd

    from food_multids.pipelines.predict.pipeline import create_serving_pipeline

    run = mlflow.active_run()
    if run is None:
        logger.warning("No active MLflow run (tracking disabled for this pipeline?): the served model is not logged")
        return {"logged": False}
    name = predict_params.get("registered_model_name") or "food_multids"
    catalog = DataCatalog({"best_model": LoadedModelDataset(str(Path(model_dir).resolve()),
                                                            predict_params.get("device", "auto")),
                           "params:predict": MemoryDataset(predict_params)})
    served = ServedClassifier(create_serving_pipeline(), catalog, input_name=INPUT_NAME)
    image, dataset = example
    request = pd.DataFrame({"image": [base64.b64encode(Path(image).read_bytes()).decode()], "dataset_name": [dataset]})
    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=served,
                                       artifacts=served.extract_pipeline_artifacts(Path(tmp)),
                                       signature=signature(), input_example=request,
                                       pip_requirements=_requirements(), registered_model_name=name)
    registered = {"logged": True, "run_id": run.info.run_id, "model_uri": info.model_uri,
                  "registered_model_name": name, "registered_model_version": info.registered_model_version,
                  "registry_uri": f"models:/{name}/{info.registered_model_version}", "best_model": str(Path(model_dir).resolve())}
    logger.info("Served model logged (%s) and registered as %s: `make serve MODEL=%s`", info.model_uri,
                registered["registry_uri"], registered["registry_uri"])
    return registered
