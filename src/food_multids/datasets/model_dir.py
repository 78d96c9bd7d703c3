"""Re-export of food_multids.catalog.model_dir (the path of round two's catalog entries)."""

from food_multids.catalog.model_dir import *  # noqa: F403
from food_multids.catalog.model_dir import ModelDirectoryDataset  # noqa: F401
