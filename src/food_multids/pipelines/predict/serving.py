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

from food_multids.catalog import LoadedModelDataset
from food_multids.config import DEMO_ENVS, ConfigError, PredictConfig
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
SERVE_OVERRIDES = {**{f"FOOD_MULTIDS_{key.upper()}": key
                      for key in ("serve_batching", "serve_max_batch", "serve_max_wait_ms", "serve_max_queue")},
                   # chosen after registration (from the report's coverage curve): no new training run needed
                   "FOOD_MULTIDS_SERVE_REJECT_BELOW": "reject_below", "FOOD_MULTIDS_SERVE_CALIBRATED": "calibrated"}


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
    from mlflow.types.schema import AnyType, Array

    # The inputs are optional and of any type to MLflow's schema check, so every bad request reaches
    # records_from_request, which names the row and the fix: MLflow would answer an empty request with
    # "missing inputs ['image']" and a number for an image with "Failed to enforce schema of data '<the
    # whole request, base64 included>'".
    inputs = Schema([ColSpec(AnyType(), "image", required=False), ColSpec(AnyType(), "dataset_name", required=False)])
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


TAG = "food_multids."  # prefix of the registered versions' tags


def registered_name(predict_params: dict, env: str | None) -> tuple[str, str]:
    """The registered model's name and why: predict.registered_model_name when set, else `food_multids` for
    the demo's envs (base, local) and `food_multids-<env>` for any other, so that each task (an env: its own
    datasets and label spaces) is its own registered model and `models:/<name>/latest` never switches task."""
    name = predict_params.get("registered_model_name")
    if name:
        return str(name), "predict.registered_model_name"
    if env is None or env in DEMO_ENVS:
        return "food_multids", f"the '{env or 'local'}' env's default (predict.registered_model_name: null)"
    return f"food_multids-{env}", f"the '{env}' env's own name (predict.registered_model_name: null)"


def describe_spaces(spaces: dict[str, tuple[int, int]]) -> str:
    """'digits:10,shapes:40' (the label spaces as a registry tag: names and class counts, in head order)."""
    return ",".join(f"{name}:{count}" for name, (_, count) in sorted(spaces.items(), key=lambda item: item[1][0]))


def version_tags(model_dir: Path, env: str | None) -> dict[str, str]:
    """What a registered version says about itself: env, label spaces, backbone, fine-tuning, training run."""
    import json

    from food_multids.model.classifier import TRAINING_INFO, label_spaces_of

    info_file = Path(model_dir) / TRAINING_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    tags = {"env": info.get("kedro_env") or env, "datasets": describe_spaces(label_spaces_of(model_dir)),
            "backbone": Path(str(info["backbone"])).name if info.get("backbone") else None,
            "finetuning": info.get("finetuning"), "training_run_id": info.get("mlflow_run_id"),
            "best_step": info.get("step")}
    return {TAG + key: str(value) for key, value in tags.items() if value is not None}


def version_description(tags: dict[str, str]) -> str:
    parts = [part.split(":") for part in tags[TAG + "datasets"].split(",")]
    spaces = ", ".join(f"{name} ({classes} classes)" for name, classes in parts)
    return (f"Classifier of {spaces}; trained in the Kedro env '{tags.get(TAG + 'env', '?')}' from "
            f"{tags.get(TAG + 'backbone', '?')} ({tags.get(TAG + 'finetuning', '?')} fine-tuning), best step "
            f"{tags.get(TAG + 'best_step', '?')} of MLflow run {tags.get(TAG + 'training_run_id', '?')}.")


def other_task_warning(client, name: str, datasets: str) -> str | None:
    """The name's latest version serves other label spaces: `models:/<name>/latest` is about to switch task."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - a registry that cannot be searched: nothing to compare with
        return None
    if not versions:
        return None
    latest = max(versions, key=lambda v: int(v.version))
    theirs = (latest.tags or {}).get(TAG + "datasets")
    if theirs is None or theirs == datasets:
        return None
    return (f"the registered model '{name}' version {latest.version} serves the label spaces {theirs}; this model's "
            f"are {datasets}: `models:/{name}/latest` now serves another task. Give each task its own name "
            "(predict.registered_model_name, or leave it null for food_multids-<env>)")


@contextlib.contextmanager
def quiet_mlflow_logging():
    """MLflow's chatter while logging and registering (its cloudpickle notice, 'Validating input example',
    artifact progress bars, 'Registered model ... already exists', 'Created version'): kept at DEBUG, since
    our own line says what was registered. Errors still raise."""
    import io

    mlflow_log = logging.getLogger("mlflow")
    level, bars = mlflow_log.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    mlflow_log.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # MLflow's registry prints with eprint
            yield
    finally:
        mlflow_log.setLevel(level)
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars
        for line in printed.getvalue().splitlines():
            logger.debug("mlflow: %s", line)


def log_and_register(model_dir: Path, predict_params: dict, example: tuple[str, str]) -> dict:
    """Log the serving pipeline + `model_dir` in the active MLflow run; register it (`registered_name`), its
    version tagged and described. `example`: (an image file, its dataset) for the input example."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from food_multids.framework.run_context import run_env
    from food_multids.pipelines.predict.pipeline import create_serving_pipeline

    run = mlflow.active_run()
    if run is None:
        logger.warning("No active MLflow run (tracking disabled for this pipeline?): the served model is not logged")
        return {"logged": False}
    name, why = registered_name(predict_params, run_env())
    tags = version_tags(Path(model_dir), run_env())
    client = MlflowClient()
    warning = other_task_warning(client, name, tags[TAG + "datasets"])
    if warning:
        logger.warning(warning)
    catalog = DataCatalog({"best_model": LoadedModelDataset(str(Path(model_dir).resolve()),
                                                            predict_params.get("device", "auto")),
                           "params:predict": MemoryDataset(predict_params)})
    served = ServedClassifier(create_serving_pipeline(), catalog, input_name=INPUT_NAME)
    image, dataset = example
    request = pd.DataFrame({"image": [base64.b64encode(Path(image).read_bytes()).decode()], "dataset_name": [dataset]})
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow_logging():
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=served,
                                       artifacts=served.extract_pipeline_artifacts(Path(tmp)),
                                       signature=signature(), input_example=request,
                                       pip_requirements=_requirements(), registered_model_name=name)
    version = str(info.registered_model_version)
    # The default pipeline may run full_evaluate first (Kedro orders independent nodes by name): its
    # accuracy is then already in this run.
    final = client.get_run(run.info.run_id).data.metrics.get("final_eval_overall_accuracy")
    if final is not None:
        tags[TAG + "final_overall_accuracy"] = f"{final:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=version_description(tags))
    registered = {"logged": True, "run_id": run.info.run_id, "model_uri": info.model_uri,
                  "registered_model_name": name, "registered_model_version": info.registered_model_version,
                  "registry_uri": f"models:/{name}/{version}", "best_model": str(Path(model_dir).resolve()),
                  "name_from": why, "label_spaces": tags[TAG + "datasets"]}
    logger.info("Served model logged (%s) and registered as %s (name: %s): `make serve MODEL=%s`", info.model_uri,
                registered["registry_uri"], why, registered["registry_uri"])
    return registered


def tag_final_accuracy(training_run_id: str | None, metrics: dict[str, float]) -> list[str]:
    """Tag the versions registered by a training run with its full evaluation's accuracy (the registry then
    says how good each version is). Returns the `models:/` URIs tagged."""
    if not training_run_id or "overall_accuracy" not in metrics:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"run_id='{training_run_id}'")
    except Exception:  # noqa: BLE001 - no registry in this store
        return []
    tagged = []
    for found in versions:
        client.set_model_version_tag(found.name, found.version, TAG + "final_overall_accuracy",
                                     f"{metrics['overall_accuracy']:.4f}")
        tagged.append(f"models:/{found.name}/{found.version}")
    return tagged
