from kedro.pipeline import Node, Pipeline

from food_multids.pipelines.data.nodes import ingest_jsonl, merge_and_tag, split_eval_subsets

SECTIONS = ["params:data", "params:datasets", "params:model.num_labels"]  # what the data nodes parse


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(ingest_jsonl, inputs=SECTIONS,
             outputs=["train_records", "val_records", "rejected_rows", "ingest_summary"], name="ingest_jsonl"),
        Node(merge_and_tag, inputs=["train_records", "val_records", *SECTIONS, "params:training.seed",
                                    "params:training.shuffle"],
             outputs=["train_set", "val_set", "dataset_stats"], name="merge_and_tag"),
        Node(split_eval_subsets, inputs=["val_set", *SECTIONS, "params:training.seed"],
             outputs=["eval_subset", "full_eval_set"], name="split_eval_subsets"),
    ])
