from kedro.pipeline import Node, Pipeline

from food_multids.pipelines.predict.nodes import (
    decode_request,
    ingest_images,
    predict,
    predict_request,
)


def create_pipeline(**kwargs) -> Pipeline:
    """`kedro run --pipelines predict`: records from predict.jsonl_list / predict.image_dir -> image_predictions."""
    return Pipeline([
        Node(ingest_images, inputs=["best_model", "params:predict"],
             outputs=["predict_records", "predict_rejected_rows"],
             name="ingest_images"),
        Node(predict, inputs=["best_model", "predict_records", "params:predict", "params:training"],
             outputs="image_predictions",
             name="predict"),
    ])


def create_serving_pipeline(**kwargs) -> Pipeline:
    """What the MLflow model runs per request: base64 rows -> the same predict node."""
    return Pipeline([
        Node(decode_request, inputs=["serving_request", "best_model", "params:predict"], outputs="served_records",
             name="decode_request"),
        Node(predict_request, inputs=["best_model", "served_records", "params:predict"],
             outputs="served_predictions", name="predict_request"),
    ])
