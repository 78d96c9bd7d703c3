"""The embedded demo: two small image-classification datasets written as the JSONL a user provides.

- digits: scikit-learn's real handwritten digits (10 classes), upscaled, grayscale and palette PNGs.
- shapes: generated shapes x colours (40 classes), RGB JPEGs plus a few RGBA PNGs and CMYK JPEGs,
  so every image mode the loader converts is exercised.
Deterministic: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245)}
SIDE = 56


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_digits(root: Path, per_class_train: int = 30, per_class_val: int = 10, seed: int = 0) -> None:
    from sklearn.datasets import load_digits  # ships its 1,797 images inside the package

    digits = load_digits()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        chosen = {"train": idx[:per_class_train], "val": idx[per_class_train:per_class_train + per_class_val]}
        for split, rows in chosen.items():
            for k, i in enumerate(rows):
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
                if k % 7 == 3:
                    img = img.convert("P")
                rel = f"images/{split}/{label}_{k:03d}.png"
                (root / "digits" / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(root / "digits" / rel)
                splits[split].append({"image": rel, "label": label, "dataset_name": "digits",
                                      "label_name": str(label)})
    for split, rows in splits.items():
        _write_jsonl(root / "digits" / f"{split}.jsonl", rows)


def _draw_shape(shape: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 60, size=(SIDE, SIDE, 3), dtype=np.uint8)
    img = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(14, 22))
    cx, cy = (int(v) for v in rng.integers(r + 2, SIDE - r - 2, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(3, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(3, r // 3))
    return img


def write_shapes(root: Path, per_class_train: int = 10, per_class_val: int = 4, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    label = 0
    for shape in SHAPES:
        for colour_name, colour in COLOURS.items():
            for split, count in (("train", per_class_train), ("val", per_class_val)):
                for k in range(count):
                    img = _draw_shape(shape, colour, rng)
                    if k % 9 == 4:
                        rel, img = f"images/{split}/{label:02d}_{k:02d}.png", img.convert("RGBA")
                    elif k % 9 == 7:
                        rel, img = f"images/{split}/{label:02d}_{k:02d}.jpg", img.convert("CMYK")
                    else:
                        rel = f"images/{split}/{label:02d}_{k:02d}.jpg"
                    (root / "shapes" / rel).parent.mkdir(parents=True, exist_ok=True)
                    options = {"quality": 92} if rel.endswith(".jpg") else {}
                    img.save(root / "shapes" / rel, **options)
                    splits[split].append({"image": rel, "label": label, "dataset_name": "shapes",
                                          "label_name": f"{colour_name} {shape}"})
            label += 1
    for split, rows in splits.items():
        _write_jsonl(root / "shapes" / f"{split}.jsonl", rows)


def write_demo(root: Path, force: bool = False) -> Path:
    """Write both demo datasets under `root` (skipped when already complete, unless force)."""
    marker = root / ".complete"
    if marker.exists() and not force:
        logger.info("Demo data already in %s", root)
        return root
    write_digits(root)
    write_shapes(root)
    marker.write_text("demo v1\n")
    logger.info("Wrote demo datasets to %s", root)
    return root
