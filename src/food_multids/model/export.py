"""A LoRA classifier written as an ordinary one: the adapters merged into the weights (food-multids export).
Beside model/lora.py and model/classifier.py, importing both, so that neither imports the other back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from food_multids.model.classifier import TRAINING_INFO, MultiDatasetClassifier
from food_multids.model.loading import load_tokenizer
from food_multids.model.lora import merge_adapters


def export_merged(model_dir: Path, out: Path, dtype: str = "float32") -> int:
    """Write `model_dir` (a LoRA classifier) to `out` as an ordinary classifier folder: adapters merged in
    float32 and stored as `dtype` (float32 by default: in bfloat16 an adapter's small change to a weight
    can fall below the weight's rounding step and be lost). Returns how many layers were merged."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: export into a new folder")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model = MultiDatasetClassifier.from_pretrained(model_dir, torch.float32)
    if model.meta.finetuning != "lora":
        raise ValueError(f"{model_dir} is already an ordinary classifier (no LoRA adapters): nothing to merge")
    merged = merge_adapters(model)
    model.to(getattr(torch, dtype))
    model.backbone.config.dtype = dtype
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text()) \
        if (model_dir / "preprocessor_config.json").is_file() else None
    # Written into a hidden sibling and renamed at the end: a full disk or a kill leaves no half-written
    # `out` that a retry would refuse as "not empty".
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        model.save_pretrained(partial, load_tokenizer(model_dir), preprocessor)
        if (model_dir / TRAINING_INFO).is_file():
            info = json.loads((model_dir / TRAINING_INFO).read_text())
            info.update(finetuning="lora, merged", merged_from=str(model_dir.resolve()), merged_dtype=dtype)
            (partial / TRAINING_INFO).write_text(json.dumps(info, indent=2))
        os.replace(partial, out)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error type
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(f"cannot write the merged model to {out} ({getattr(exc, 'strerror', None) or exc}): free "
                      "space or choose a writable folder; nothing was left behind") from exc
    return merged
