from food_multids.datasets.loaded_model import LoadedModelDataset
from food_multids.datasets.model_dir import ModelDirectoryDataset

__all__ = ["LoadedModelDataset", "ModelDirectoryDataset"]
