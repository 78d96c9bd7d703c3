"""Re-export: the served model moved to food_multids.pipelines.predict.serving (issue 28). MLflow models
registered before the move pickled `food_multids.serving.ServedClassifier`; this keeps them loading.
New code imports the new path."""

from food_multids.pipelines.predict.serving import *  # noqa: F403
from food_multids.pipelines.predict.serving import ServedClassifier, log_and_register, signature  # noqa: F401
