"""predict: new images through a trained model (ingest_images -> predict), and the served model's
inference pipeline (decode_request -> predict) that every training run logs to MLflow."""

from food_multids.pipelines.predict.pipeline import (
    create_pipeline,
    create_serving_pipeline,
)

__all__ = ["create_pipeline", "create_serving_pipeline"]
