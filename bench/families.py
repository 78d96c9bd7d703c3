"""The tiny model of every backbone family on CPU: backbone parameters, weight file size, and forward
time per image (batch 16, eval mode, 2 threads, median of 10 after 2 warm-ups), side by side in one run.

Run: .venv/bin/python bench/families.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from food_multids.config import ModelConfig
from food_multids.data.collator import create_collator
from food_multids.model.backbones import SUPPORTED, family
from food_multids.model.classifier import ClassifierMeta, LabelSpace, create_classifier
from food_multids.model.loading import load_tokenizer
from food_multids.model.tiny import build_tiny_model_dir
from food_multids.runtime.scoring import MODEL_INPUTS

BATCH, REPEATS = 16, 12


def measure(folder: Path, model_type: str) -> str:
    side = family(model_type).patch_size * 4  # one 2x2 group of merged patches: 56 or 64 px
    torch.manual_seed(0)
    meta = ClassifierMeta(num_labels=40, pooling="image_mean", label_spaces={"a": LabelSpace(0, 40)})
    model = create_classifier(folder, meta, "float32", torch.device("cpu")).eval()
    encoder, collator = create_collator(folder, ModelConfig(num_labels=40, min_pixels=side * side,
                                                            max_pixels=side * side), load_tokenizer(folder))
    rng = np.random.default_rng(0)
    samples = []
    for i in range(BATCH):
        patches, grid = encoder(Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)))
        samples.append({"pixel_values": patches, "grid": grid, "label": 0, "dataset_id": 0, "num_classes": 40,
                        "sample_id": i})
    batch = collator(samples)
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    times = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.backbone.parameters())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return (f"{model_type:<11} {params / 1e6:6.3f} M backbone parameters  {size / 1e6:5.2f} MB weights  "
            f"{side}x{side} px  {np.median(times[2:]) * 1000 / BATCH:5.2f} ms/image forward")


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in SUPPORTED:
            folder = build_tiny_model_dir(Path(tmp) / model_type, family_name=model_type)
            print(measure(folder, model_type))  # noqa: T201


if __name__ == "__main__":
    main()
