from kedro.pipeline import Node, Pipeline

from food_multids.pipelines.register.nodes import log_served_model


def create_pipeline(**kwargs) -> Pipeline:
    """The end of every training run: the serving pipeline + best model as an MLflow model, registered."""
    return Pipeline([
        Node(log_served_model, inputs=["best_model", "full_eval_set", "params:predict"], outputs="registered_model",
             name="log_served_model"),
    ])
