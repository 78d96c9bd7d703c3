from kedro.pipeline import Node, Pipeline

from food_multids.pipelines import section_inputs as params
from food_multids.pipelines.report.nodes import REPORT_SECTIONS, report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(report, inputs=["training_history", "eval_metrics", "predictions", "confusions", "dataset_stats",
                             "best_model_info", *params(REPORT_SECTIONS)],
             outputs=["report_html", "report_md"], name="report"),
    ])
