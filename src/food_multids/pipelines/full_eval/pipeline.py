from kedro.pipeline import Node, Pipeline

from food_multids.pipelines import section_inputs as params
from food_multids.pipelines.full_eval.nodes import EVAL_SECTIONS, full_evaluate


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(full_evaluate, inputs=["best_model", "full_eval_set", *params(EVAL_SECTIONS), "best_model_info"],
             outputs=["eval_metrics", "predictions", "confusions"], name="full_evaluate"),
    ])
