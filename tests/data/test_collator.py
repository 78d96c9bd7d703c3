from __future__ import annotations

import importlib
import logging
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from food_multids.data.collator import (
    ClassificationCollator,
    ImageEncoder,
    PromptTokens,
    load_rgb,
    smart_resize,
)
from food_multids.data.dataset import RecordDataset, TooManyBadImages
from food_multids.model.loading import load_tokenizer
from tests.conftest import write_image


def qwen_vl_utils_smart_resize():
    """qwen-vl-utils' own function; its module imports torchvision, which cannot load beside the CPU
    torch wheel, so a placeholder module stands in for the import (smart_resize does not use it)."""
    fake = types.ModuleType("torchvision")
    fake.io, fake.transforms = types.ModuleType("io"), types.ModuleType("transforms")
    fake.transforms.InterpolationMode = object
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.io", "torchvision.transforms")}
    sys.modules.update({"torchvision": fake, "torchvision.io": fake.io, "torchvision.transforms": fake.transforms})
    try:
        sys.modules.pop("qwen_vl_utils.vision_process", None)
        return importlib.import_module("qwen_vl_utils.vision_process").smart_resize
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_smart_resize_follows_qwen_vl_utils_rules():
    reference = qwen_vl_utils_smart_resize()
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(10, 3000, 2))
        lo = int(rng.integers(28 * 28, 400 * 400))
        hi = lo + int(rng.integers(0, 1200 * 1200))
        expected = tuple(max(28, v) for v in reference(h, w, 28, lo, hi))  # ours never returns a 0 side
        assert smart_resize(h, w, 28, lo, hi) == expected, (h, w, lo, hi)


def test_very_thin_images_keep_one_patch_group():
    assert smart_resize(29, 1000, 28, 3136, 3136) == (28, 112)


@pytest.mark.parametrize("size", [(56, 56), (37, 100), (300, 200), (80, 300)])
@pytest.mark.parametrize("pixels", [(3136, 3136), (3136, 200 * 200)])
def test_encoder_matches_qwen2vl_image_processor(size, pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil(min_pixels=pixels[0], max_pixels=pixels[1])
    expected = ref(images=[img], return_tensors="pt")
    patches, grid = ImageEncoder(*pixels)(img)
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    assert torch.allclose(patches, expected["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = write_image(tmp_path / f"x.{fmt.lower()}", (120, 40, 200), mode=mode, fmt=fmt)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (56, 56)
    patches, grid = ImageEncoder(3136, 3136)(img)
    assert patches.shape == (16, 1176) and grid == (1, 4, 4)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (56, 56), (255, 0, 0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def frame_for(paths):
    return pd.DataFrame({"image": [str(p) for p in paths], "label": range(len(paths)), "dataset_id": 0,
                         "num_classes": 10, "sample_id": range(len(paths)), "dataset_name": "a"})


def test_collator_pads_and_carries_per_sample_fields(tiny_model_dir, tmp_path):
    paths = [write_image(tmp_path / "a.png", size=(56, 56)), write_image(tmp_path / "b.png", size=(112, 56))]
    encoder = ImageEncoder.from_pretrained(tiny_model_dir, 3136, 112 * 112)
    prompt = PromptTokens.from_tokenizer(load_tokenizer(tiny_model_dir), "What is this?")
    dataset = RecordDataset(frame_for(paths), encoder)
    for side in ("left", "right"):
        batch = ClassificationCollator(prompt, 2, side)([dataset[0], dataset[1]])
        n_img = [4, 8]
        lengths = [len(prompt.prefix) + n + len(prompt.suffix) for n in n_img]
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert (batch["input_ids"] == prompt.image_token_id).sum(1).tolist() == n_img
        pad_col = 0 if side == "left" else -1
        assert batch["attention_mask"][0, pad_col] == 0 and batch["input_ids"][0, pad_col] == prompt.pad_token_id
        assert batch["pixel_values"].shape == (16 + 32, 1176)
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
        assert batch["labels"].tolist() == [0, 1] and batch["num_classes"].tolist() == [10, 10]
        assert batch["dataset_ids"].tolist() == [0, 0]
        assert batch["skipped"] == 0


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tiny_model_dir, tmp_path, caplog):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])
    encoder = ImageEncoder(3136, 3136)
    prompt = PromptTokens.from_tokenizer(load_tokenizer(tiny_model_dir), "What is this?")
    dataset = RecordDataset(frame_for([good, bad]), encoder)
    with caplog.at_level(logging.WARNING):
        batch = ClassificationCollator(prompt)([dataset[0], dataset[1]])
    assert batch["skipped"] == 1 and batch["labels"].tolist() == [0]
    assert batch["skipped_dataset_ids"].tolist() == [int(dataset.dataset_ids[1])]
    assert f"Skipping unreadable image {bad}" in caplog.text


def test_a_run_of_bad_images_aborts(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = RecordDataset(frame_for([bad] * 5), ImageEncoder(3136, 3136), max_consecutive_failures=3)
    assert dataset[0]["failed"] and dataset[1]["failed"]
    with pytest.raises(TooManyBadImages, match="3 images in a row failed to load"):
        dataset[2]


def test_a_batch_of_only_bad_images_is_an_error(tiny_model_dir):
    prompt = PromptTokens.from_tokenizer(load_tokenizer(tiny_model_dir), "x")
    with pytest.raises(RuntimeError, match="all 2 images of a batch failed"):
        ClassificationCollator(prompt)([None, None])


@pytest.mark.parametrize(("values", "expected"), [
    (np.full((8, 8), 32896, dtype=np.uint16), 128),  # 16-bit mid-grey
    (np.full((8, 8), 200, dtype=np.uint16), 1),  # a dark 16-bit image stays dark (scaled by bit depth, not content)
    (np.full((8, 8), 0.5, dtype=np.float32), 128),  # float in [0, 1]
    (np.full((8, 8), 100.0, dtype=np.float32), 100),  # float in [0, 255]
])
def test_wide_greyscale_images_are_scaled_by_value_range(tmp_path, values, expected):
    path = tmp_path / ("img.png" if values.dtype == np.uint16 else "img.tiff")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (8, 8, 3) and (rgb == expected).all(), rgb[0, 0]


def test_a_float_image_outside_known_ranges_is_an_error_naming_the_range(tmp_path):
    Image.fromarray(np.full((4, 4), 1000.0, dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"values in \[1000, 1000\]: expected \[0, 1\] or \[0, 255\]"):
        load_rgb(tmp_path / "f.tiff")
