from kedro.pipeline import Node, Pipeline

from food_multids.pipelines.train.nodes import rerank_candidates, select_best, train_deepspeed


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(train_deepspeed, inputs=["train_set", "eval_subset", "full_eval_set", "parameters"],
             outputs=["training_history", "checkpoint_manifest"], name="train_deepspeed"),
        Node(rerank_candidates, inputs=["checkpoint_manifest", "full_eval_set", "parameters"],
             outputs="candidate_evals", name="rerank_candidates"),
        Node(select_best, inputs=["training_history", "checkpoint_manifest", "candidate_evals", "full_eval_set",
                                  "parameters"],
             outputs=["best_model", "best_model_info"], name="select_best"),
    ])
