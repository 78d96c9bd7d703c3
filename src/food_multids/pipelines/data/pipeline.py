from kedro.pipeline import Node, Pipeline

from food_multids.pipelines.data.nodes import ingest_jsonl, merge_and_tag, split_eval_subsets


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(ingest_jsonl, inputs="parameters",
             outputs=["train_records", "val_records", "rejected_rows", "ingest_summary"], name="ingest_jsonl"),
        Node(merge_and_tag, inputs=["train_records", "val_records", "parameters"],
             outputs=["train_set", "val_set", "dataset_stats"], name="merge_and_tag"),
        Node(split_eval_subsets, inputs=["val_set", "parameters"],
             outputs=["eval_subset", "full_eval_set"], name="split_eval_subsets"),
    ])
