"""Re-export of food_multids.catalog.loaded_model (the path MLflow models registered before issue 28 pickled)."""

from food_multids.catalog.loaded_model import *  # noqa: F403
from food_multids.catalog.loaded_model import LoadedModelDataset  # noqa: F401
