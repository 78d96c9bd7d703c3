"""Where a model to predict with comes from: a folder, or an MLflow model logged by a training run."""

from __future__ import annotations

from pathlib import Path

import yaml

from food_multids.config.paths import resolve_path


def local_model_dir(source: str) -> Path:
    """A classifier folder from predict.model / the CLI: a folder (relative to the project root) or an
    MLflow model URI (models:/name/version, runs:/id/model, models:/m-...), downloaded from the store."""
    if source.startswith(("models:/", "runs:/")) or "://" in source:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        except MlflowException as exc:  # an unknown name, version or run: the store's own words, first line
            message = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
            store = mlflow.get_tracking_uri()
            raise FileNotFoundError(f"{source} is not in the MLflow store {store}: {message}") from exc
        mlmodel = root / "MLmodel"
        if not mlmodel.is_file():
            raise FileNotFoundError(f"{source} is not an MLflow model (no MLmodel file in {root})")
        flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {})
        artifacts = flavors.get("python_function", {}).get("artifacts", {})
        if "best_model" not in artifacts:
            raise FileNotFoundError(f"{source} is not a food_multids model (no best_model artifact in its MLmodel)")
        return root / artifacts["best_model"]["path"]
    path = resolve_path(source)
    if not (path / "classifier.json").is_file():
        raise FileNotFoundError(f"{path} is not a trained classifier folder (no classifier.json): predict.model takes "
                                "a best_model version folder, or an MLflow URI like models:/food_multids/1")
    return path
