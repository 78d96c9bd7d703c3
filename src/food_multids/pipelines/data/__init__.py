from food_multids.pipelines.data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
