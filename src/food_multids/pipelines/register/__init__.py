"""The last step of training: the served model (serving pipeline + best model) logged and registered."""

from food_multids.pipelines.register.pipeline import create_pipeline

__all__ = ["create_pipeline"]
