"""A saved classifier loaded once for inference, and the batched loop every consumer shares: the full
evaluation (which scores its rows), the predict pipeline, the served MLflow model and the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from food_multids.config import ModelConfig, recorded_config
from food_multids.data.collator import ClassificationCollator, ImageEncoder, create_collator
from food_multids.data.dataset import RecordDataset
from food_multids.data.sampler import ShardedEvalSampler
from food_multids.model.classifier import TRAINING_INFO, MultiDatasetClassifier, check_image_token
from food_multids.model.loading import load_tokenizer, resolve_dtype
from food_multids.model.speedups import prepare_model
from food_multids.runtime.scoring import EvalOutput, evaluate

logger = logging.getLogger(__name__)

def trained_model_settings(model_dir: Path) -> ModelConfig | None:
    """The `model:` settings a saved classifier was trained with (image sizes, padding side, dtype), from
    its training_info.json; None for a folder without them (then the caller's settings apply)."""
    info_file = Path(model_dir) / TRAINING_INFO
    if not info_file.is_file():
        return None
    cfg = recorded_config(json.loads(info_file.read_text()), f"{info_file}: using the run's settings or defaults")
    return cfg.model if cfg is not None else None


@dataclass
class LoadedModel:
    """A classifier on its device with the image encoder and collator it was trained with."""

    model: MultiDatasetClassifier
    model_dir: Path
    settings: ModelConfig
    device: torch.device
    dtype: torch.dtype
    encoder: ImageEncoder
    collator: ClassificationCollator

    def __deepcopy__(self, memo: dict) -> LoadedModel:
        # kedro-mlflow's served model deep-copies its in-memory catalog on every request; the weights
        # are read-only at inference, so every request shares this one copy.
        return self

    @property
    def label_spaces(self) -> dict[str, tuple[int, int]]:
        """{dataset name: (dataset id, number of classes)} in head order."""
        return self.model.meta.spaces()

    def class_names(self, dataset: str) -> list[str] | None:
        return self.model.meta.label_spaces[dataset].id2label


# How to compute, not what: these come from the run's `model:` section; the rest (image sizes, padding
# side) from the settings the model was trained with, so it sees images as in training.
SPEED_SETTINGS = ("torch_dtype", "attn_implementation", "batched_vision_windows", "torch_compile", "torch_compile_mode")


def load_model(model_dir: Path, device: torch.device, settings: ModelConfig | None = None) -> LoadedModel:
    """Load a saved classifier for inference with the image settings recorded at training (falling back to
    `settings`, the run's `model:` section, for a folder without a record) and the run's speed settings."""
    model_dir = Path(model_dir)
    recorded = trained_model_settings(model_dir)
    if recorded is not None and settings is not None:
        settings = dataclasses.replace(recorded, **{k: getattr(settings, k) for k in SPEED_SETTINGS})
    settings = settings or recorded or ModelConfig(num_labels=1)
    dtype = resolve_dtype(settings.torch_dtype, device)
    model = MultiDatasetClassifier.from_pretrained(model_dir, dtype, settings.attn_implementation).to(device)
    model.eval()
    prepare_model(model, settings, training=False)
    encoder, collator = create_collator(
        model_dir, settings, load_tokenizer(model_dir), model.meta.prompt,
        processor_config=model.kind.preprocessor_config(model_dir, settings.min_pixels, settings.max_pixels))
    check_image_token(collator, model, model_dir)
    return LoadedModel(model, model_dir, settings, device, dtype, encoder, collator)


def records_loader(loaded: LoadedModel, frame: pd.DataFrame, batch_size: int, workers: int = 0, rank: int = 0,
                   world: int = 1, max_consecutive_bad_images: int = 10) -> DataLoader:
    """This rank's shard of `frame` (image, label, dataset_id, num_classes, sample_id), encoded and
    collated as the model was trained."""
    return DataLoader(RecordDataset(frame, loaded.encoder, max_consecutive_bad_images),
                      batch_sampler=ShardedEvalSampler(len(frame), batch_size, world, rank),
                      collate_fn=loaded.collator, num_workers=workers, pin_memory=loaded.device.type == "cuda",
                      prefetch_factor=4 if workers else None)


def run_model(loaded: LoadedModel, frame: pd.DataFrame, *, batch_size: int, top_k: int, workers: int = 0,
              rank: int = 0, world: int = 1, max_consecutive_bad_images: int = 10, desc: str = "predict",
              progress_mode: str = "auto", own_classes: bool = False, calibrated: bool = False,
              temperature_grid: np.ndarray | None = None) -> EvalOutput:
    """Every row of `frame` (this rank's shard) through the model: per-row top-k with masked-softmax
    probabilities, plus loss/accuracy sums for labelled rows. The one inference loop of the project.
    `own_classes`: rank within each row's dataset even for a model trained without masking. `calibrated`:
    probabilities with the model's fitted temperatures (classifier.json `calibration`; none fitted: T = 1).
    `temperature_grid` (datasets x G): each row's loss and top-1 probability at those temperatures."""
    loader = records_loader(loaded, frame, batch_size, workers, rank, world, max_consecutive_bad_images)
    temperature = loaded_temperatures(loaded) if calibrated else None
    grid = None if temperature_grid is None else torch.as_tensor(temperature_grid, dtype=torch.float32,
                                                                 device=loaded.device)
    return evaluate(loaded.model, loader, loaded.device, max(1, len(loaded.model.meta.label_spaces)), top_k=top_k,
                    masking=loaded.model.meta.enable_logits_masking, dtype=loaded.dtype, desc=desc,
                    progress_mode=progress_mode, own_classes=own_classes, temperature=temperature,
                    temperature_grid=grid)


def loaded_temperatures(loaded: LoadedModel) -> torch.Tensor | None:
    """The model's fitted temperature per dataset (head order) on its device, or None when none was fitted."""
    calibration = loaded.model.meta.calibration or {}
    fitted = calibration.get("temperature") or {}
    if not fitted:
        return None
    spaces = loaded.model.meta.spaces()
    values = [float(fitted.get(name, 1.0)) for name in spaces]
    return torch.tensor(values, dtype=torch.float32, device=loaded.device)
