from food_multids.catalog.loaded_model import LoadedModelDataset
from food_multids.catalog.model_dir import ModelDirectoryDataset

__all__ = ["LoadedModelDataset", "ModelDirectoryDataset"]
