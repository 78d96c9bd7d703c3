from food_multids.pipelines.train.pipeline import create_pipeline

__all__ = ["create_pipeline"]
