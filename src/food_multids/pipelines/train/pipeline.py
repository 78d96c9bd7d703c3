from kedro.pipeline import Node, Pipeline

from food_multids.pipelines import section_inputs as params
from food_multids.pipelines.train.nodes import (
    RERANK_SECTIONS,
    SELECT_SECTIONS,
    TRAIN_SECTIONS,
    rerank_candidates,
    select_best,
    train_deepspeed,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(train_deepspeed, inputs=["train_set", "eval_subset", "full_eval_set", *params(TRAIN_SECTIONS)],
             outputs=["training_history", "checkpoint_manifest"], name="train_deepspeed"),
        Node(rerank_candidates, inputs=["checkpoint_manifest", "full_eval_set", *params(RERANK_SECTIONS)],
             outputs="candidate_evals", name="rerank_candidates"),
        Node(select_best, inputs=["training_history", "checkpoint_manifest", "candidate_evals", "full_eval_set",
                                  *params(SELECT_SECTIONS)],
             outputs=["best_model", "best_model_info"], name="select_best"),
    ])
