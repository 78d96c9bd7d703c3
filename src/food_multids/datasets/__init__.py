"""Re-export: the Kedro dataset classes moved to food_multids.catalog (issue 28). MLflow models registered
before the move pickled `food_multids.datasets.loaded_model.LoadedModelDataset`, and a user's catalog.yml
may name `food_multids.datasets.ModelDirectoryDataset`; both keep working. New code uses food_multids.catalog."""

from food_multids.catalog import *  # noqa: F403
from food_multids.catalog import LoadedModelDataset, ModelDirectoryDataset  # noqa: F401
