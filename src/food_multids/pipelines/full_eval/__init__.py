from food_multids.pipelines.full_eval.pipeline import create_pipeline

__all__ = ["create_pipeline"]
