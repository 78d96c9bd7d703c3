"""A Kedro dataset that loads a saved classifier into memory, ready to predict (the served model's
`best_model`: kedro-mlflow loads it once when the server starts, not once per request)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError


class LoadedModelDataset(AbstractDataset):
    """load() -> food_multids.inference.model.LoadedModel on `device` (auto: a GPU when one is visible)."""

    def __init__(self, filepath: str, device: str = "auto"):
        self._filepath = PurePosixPath(Path(filepath).as_posix())  # kedro-mlflow repoints this at the artifact
        self._device = device

    def load(self):
        import torch

        from food_multids.inference.model import load_model

        path = Path(str(self._filepath))
        if not (path / "config.json").is_file():
            raise DatasetError(f"{path} is not a complete model directory (no config.json)")
        use_cuda = self._device == "cuda" or (self._device == "auto" and torch.cuda.is_available())
        return load_model(path, torch.device("cuda" if use_cuda else "cpu"))

    def save(self, data: Any) -> None:
        raise DatasetError("LoadedModelDataset is read-only: save model directories with ModelDirectoryDataset")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "device": self._device}
