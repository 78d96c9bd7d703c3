from food_multids.datasets.model_dir import ModelDirectoryDataset

__all__ = ["ModelDirectoryDataset"]
