"""torch Dataset over a record table: loads, converts and encodes one image per item."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from food_multids.data.collator import ImageEncoder, load_rgb

logger = logging.getLogger(__name__)


class TooManyBadImages(RuntimeError):
    pass


class RecordDataset(Dataset):
    """Item i: encoded image, label, dataset id and name, num_classes, sample id; a `failed` marker
    with the dataset id when the image cannot be read.

    A corrupt image is skipped with a warning naming the file; `max_consecutive_failures` in a row
    (per loader worker) abort with an error, since that means a broken mount rather than bad files.
    """

    def __init__(self, records: pd.DataFrame, encoder: ImageEncoder, max_consecutive_failures: int = 10):
        # Paths; the served model passes images it already decoded and checked (PIL images).
        self.images = [v if isinstance(v, Image.Image) else str(v) for v in records["image"].tolist()]
        self.labels = records["label"].to_numpy(dtype=np.int64)
        self.dataset_ids = records["dataset_id"].to_numpy(dtype=np.int64)
        self.num_classes = records["num_classes"].to_numpy(dtype=np.int64)
        self.sample_ids = records["sample_id"].to_numpy(dtype=np.int64)
        self.encoder = encoder
        self.max_consecutive_failures = max_consecutive_failures
        self._consecutive_failures = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict | None:
        # Negative i: a padding slot of ShardedEvalSampler for row -1 - i; it counts for nothing.
        weight = 1.0 if i >= 0 else 0.0
        i = i if i >= 0 else -1 - i
        path = self.images[i]
        try:
            patches, grid = self.encoder(path if isinstance(path, Image.Image) else load_rgb(path))
        except Exception as exc:  # PIL raises many types for bad files; all mean "skip this one"
            self._consecutive_failures += 1
            logger.warning("Skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
            if self._consecutive_failures >= self.max_consecutive_failures:
                raise TooManyBadImages(
                    f"{self._consecutive_failures} images in a row failed to load, last {path}: check the image "
                    "folder is mounted and readable (training.max_consecutive_bad_images)") from exc
            # Counted per dataset by the collator and reported, rather than silently missing.
            return {"failed": True, "dataset_id": int(self.dataset_ids[i]), "weight": weight}
        self._consecutive_failures = 0
        return {"pixel_values": patches, "grid": grid, "label": int(self.labels[i]),
                "dataset_id": int(self.dataset_ids[i]), "num_classes": int(self.num_classes[i]),
                "sample_id": int(self.sample_ids[i]), "weight": weight}
