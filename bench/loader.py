"""Loader throughput: images/s of the training input pipeline (JPEG decode -> RGB -> resize -> patches
-> collate) for 0, 1, 2, ... DataLoader workers, against the rate the GPU consumes.

    .venv/bin/python bench/loader.py              # 448x448 (conf/gpu), 256 generated 512x384 JPEGs
    IMG=56 .venv/bin/python bench/loader.py       # the demo's resolution

The dataset, encoder and collator are the ones the train and full_eval nodes use (RecordDataset,
ImageEncoder, ClassificationCollator); the DataLoader gets the same arguments as Trainer._loader.
Prints images/s per worker count, the speed-up over the in-process loader (workers=0, measured in the
same run), and how many workers keep up with GPU_RATE images/s (default 42.8: the 3B training step on
one H200, bench/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from food_multids.data.collator import ClassificationCollator, ImageEncoder, PromptTokens  # noqa: E402
from food_multids.data.dataset import RecordDataset  # noqa: E402
from food_multids.model.tiny import build_tokenizer  # noqa: E402

IMG = int(os.environ.get("IMG", "448"))
N = int(os.environ.get("N", "256"))
BATCH = int(os.environ.get("BATCH", "16"))
WORKERS = [int(w) for w in os.environ.get("WORKERS", "0,1,2").split(",")]
GPU_RATE = float(os.environ.get("GPU_RATE", "42.8"))


def write_images(folder: Path) -> pd.DataFrame:
    """Photo-like JPEGs (smooth colour fields plus noise, quality 90), 512x384 like a typical food photo."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:384, 0:512]
    paths = []
    for i in range(N):
        base = np.stack([np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90)) for c in range(3)], -1)
        pixels = np.clip((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return pd.DataFrame({"image": paths, "label": np.arange(N) % 101, "dataset_id": np.arange(N) % 2,
                         "num_classes": np.where(np.arange(N) % 2 == 0, 101, 2000), "sample_id": np.arange(N),
                         "dataset_name": np.where(np.arange(N) % 2 == 0, "food101", "food2k")})


def main() -> None:
    tokenizer = build_tokenizer()
    encoder = ImageEncoder(IMG * IMG, IMG * IMG)
    collator = ClassificationCollator(PromptTokens.from_tokenizer(tokenizer, "What food is shown in this image?"),
                                      encoder.merge_size, "left")
    with tempfile.TemporaryDirectory() as tmp:
        records = write_images(Path(tmp))
        batches = [list(range(i, min(i + BATCH, N))) for i in range(0, N, BATCH)]
        results = []
        for workers in WORKERS:
            loader = DataLoader(RecordDataset(records, encoder), batch_sampler=batches, collate_fn=collator,
                                num_workers=workers, pin_memory=False, persistent_workers=False,
                                prefetch_factor=4 if workers else None)
            start = time.perf_counter()
            first = None
            images = 0
            for batch in loader:
                images += batch["labels"].shape[0]
                first = first or time.perf_counter()
            total = time.perf_counter() - start
            steady = (images - BATCH) / (time.perf_counter() - first) if images > BATCH else float("nan")
            results.append({"workers": workers, "images": images, "seconds": round(total, 2),
                            "images_per_s": round(images / total, 1), "steady_images_per_s": round(steady, 1)})
            print("LOADER", json.dumps(results[-1]), flush=True)
    base = results[0]["images_per_s"] if results and results[0]["workers"] == 0 else None
    per_worker = max(r["steady_images_per_s"] / max(r["workers"], 1) for r in results)
    for r in results:
        speedup = f"{r['images_per_s'] / base:.2f}x workers=0" if base else "n/a"
        print(f"workers={r['workers']}: {r['images_per_s']:.1f} img/s ({r['steady_images_per_s']:.1f} after the first "
              f"batch), {speedup}")
    print(f"{IMG}x{IMG}: about {per_worker:.1f} img/s per worker process on this machine ({os.cpu_count()} cores); "
          f"{GPU_RATE} img/s needs {math.ceil(GPU_RATE / per_worker)} worker(s) on free cores (conf/gpu sets "
          "training.dataloader_num_workers: 8)")


if __name__ == "__main__":
    main()
