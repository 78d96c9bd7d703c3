"""The report: what the full evaluation measured, with the training curves and the configuration."""

from food_multids.pipelines.report.pipeline import create_pipeline

__all__ = ["create_pipeline"]
