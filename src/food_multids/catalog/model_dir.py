"""A versioned Kedro dataset for a model directory (the output of save_pretrained)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version


class ModelDirectoryDataset(AbstractVersionedDataset[Path | str, Path]):
    """save(path) copies a model directory into the next version; load() returns the version's path.

    Loading returns the path rather than a model so the caller picks device, dtype and process count
    (`MultiDatasetClassifier.from_pretrained(catalog.load("best_model"))`). The copy goes to a
    temporary sibling first and is renamed into place, so a version directory is always complete.
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(Path(filepath).as_posix()), version=version)
        self.metadata = metadata

    def load(self) -> Path:
        path = Path(str(self._get_load_path()))
        if not (path / "config.json").is_file():
            raise DatasetError(f"{path} is not a complete model directory (no config.json)")
        return path

    def save(self, data: Path | str) -> None:
        source = Path(data)
        if not source.is_dir():
            raise DatasetError(f"ModelDirectoryDataset.save expects a model directory, got {source}")
        target = Path(str(self._get_save_path()))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        staging.replace(target)

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return Path(str(path)).is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
