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
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from kedro.io import DataCatalog, MemoryDataset

from food_multids.datasets import LoadedModelDataset
from food_multids.inference.inputs import BadRequest
from food_multids.paths import resolve_path

# mlflow asks every PythonModel subclass, on definition, for type hints to infer a signature from; this
# one logs an explicit signature.
# (Recorded and dropped: importing kedro_mlflow puts its own filters in front of any filter set here.)
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    from kedro_mlflow.mlflow import KedroPipelineModel

    class ServedClassifier(KedroPipelineModel):
        """KedroPipelineModel whose bad input is the client's fault: an HTTP 400 naming each bad row."""

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            try:
                with _quiet("kedro"):  # the runner's per-node INFO lines, on every request
                    return super().predict(context, model_input, params)
            except Exception as exc:
                cause = exc
                while cause is not None and not isinstance(cause, BadRequest):
                    cause = cause.__cause__ or cause.__context__
                if cause is None:
                    raise
                raise MlflowException(str(cause), error_code=INVALID_PARAMETER_VALUE) from None

for _w in _caught:
    if "Add type hints to the `predict` method" not in str(_w.message):
        warnings.warn_explicit(_w.message, _w.category, _w.filename, _w.lineno)

logger = logging.getLogger(__name__)

INPUT_NAME = "serving_request"
MODEL_NAME = "model"  # the logged model's name inside its run
REQUIREMENTS = ("torch", "transformers", "pillow", "pandas", "pyarrow", "safetensors", "kedro", "kedro-datasets",
                "kedro-mlflow", "mlflow")


@contextlib.contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "dataset_name", required=False)])
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


def local_model_dir(source: str) -> Path:
    """A classifier folder from predict.model / the CLI: a folder (relative to the project root) or an
    MLflow model URI (models:/name/version, runs:/id/model, models:/m-...), downloaded from the store."""
    if source.startswith(("models:/", "runs:/")) or "://" in source:
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        mlmodel = root / "MLmodel"
        if not mlmodel.is_file():
            raise FileNotFoundError(f"{source} is not an MLflow model (no MLmodel file in {root})")
        artifacts = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {}).get("artifacts", {})
        if "best_model" not in artifacts:
            raise FileNotFoundError(f"{source} is not a food_multids model (no best_model artifact in its MLmodel)")
        return root / artifacts["best_model"]["path"]
    path = resolve_path(source)
    if not (path / "classifier.json").is_file():
        raise FileNotFoundError(f"{path} is not a trained classifier folder (no classifier.json): predict.model takes "
                                "a best_model version folder, or an MLflow URI like models:/food_multids/1")
    return path
