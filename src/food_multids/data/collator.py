"""Images to Qwen VL inputs: resize rules, patch layout, prompt tokens and batch collation.

The prompt is the same for every sample, so it goes through the tokenizer's chat template once; a
batch is then built by placing each image's pad tokens between the cached prefix and suffix ids
(no tokenizer call per sample). The patch layout equals Qwen2-VL's image processor (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from food_multids.data.records import MAX_ASPECT_RATIO


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 448 * 448) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same rules as qwen-vl-utils' smart_resize (which cannot be imported without torchvision), except that
    a side is never shrunk below one `factor`.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # qwen-vl-utils can floor a thin side to 0 here (then the image processor fails); keep one unit.
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        if h < factor:
            h, w = factor, max(factor, math.floor(max_pixels / factor / factor) * factor)
        elif w < factor:
            h, w = max(factor, math.floor(max_pixels / factor / factor) * factor), factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit 'L' by value range.

    Pillow's own convert clips these to 0..255 (a 16-bit photo turns near black-and-white, a float
    one in [0, 1] turns black). Integers: 0..255 kept, up to 65535 scaled as 16-bit, larger by the
    maximum; 16-bit modes always by their bit depth. Floats: [0, 1] or [0, 255]; any other range is
    an error naming it.
    """
    values = np.asarray(img, dtype=np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F":
        if low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        else:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]")
    elif low < 0:
        raise ValueError(f"{img.mode} image with negative values (min {low:g})")
    else:
        # 16-bit modes by their bit depth (a dark 16-bit image stays dark); 32-bit 'I' by its values.
        sixteen = img.mode.startswith("I;16")
        if sixteen:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0 if high <= 255 else 255.0 / 65535.0 if high <= 65535 else 255.0 / high
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: str | Path) -> Image.Image:
    """Open any mode as RGB; transparency is composited on white (as qwen-vl-utils does); 16-bit and
    float greyscale are scaled by value range."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            return _wide_to_8bit(img).convert("RGB")
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return img.convert("RGB")


@dataclass(frozen=True)
class ImageEncoder:
    """PIL image -> flattened patches (n_patches, 3*T*P*P) and its (t, h, w) grid."""

    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def from_pretrained(cls, path: Path, min_pixels: int, max_pixels: int) -> ImageEncoder:
        """Read normalisation and patch sizes from the checkpoint's preprocessor_config.json."""
        import json

        conf_file = path / "preprocessor_config.json"
        return cls.from_config(json.loads(conf_file.read_text()) if conf_file.is_file() else {}, min_pixels, max_pixels)

    @classmethod
    def from_config(cls, conf: dict, min_pixels: int, max_pixels: int) -> ImageEncoder:
        """From an image processor config (preprocessor_config.json's keys); missing keys: Qwen2-VL's."""
        keys = ("patch_size", "merge_size", "temporal_patch_size")
        extra = {k: conf[k] for k in keys if k in conf}
        if "image_mean" in conf:
            extra["mean"], extra["std"] = tuple(conf["image_mean"]), tuple(conf["image_std"])
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **extra)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        h, w = self.target_size(image.height, image.width)
        if (w, h) != image.size:
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        pixels = pixels.mul_(1 / 255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        pixels = (pixels - mean) / std
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        # (C, H, W) -> (gh/m, gw/m, m, m, C, T, p, p): the order Qwen2-VL's vision tower expects.
        x = pixels.reshape(3, gh // m, m, p, gw // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
        patches = x.reshape(gh * gw, 3 * t * p * p)
        return patches, (1, gh, gw)


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the chat prompt around its single image placeholder."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    image_token_id: int
    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, prompt: str) -> PromptTokens:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if ids.count(image_id) != 1:
            raise ValueError("the chat template must place exactly one <|image_pad|> token, got "
                             f"{ids.count(image_id)}: {text!r}")
        cut = ids.index(image_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(tuple(ids[:cut]), tuple(ids[cut + 1:]), image_id, pad)


@lru_cache(maxsize=256)
def mrope_positions(prefix_len: int, grid: tuple[int, int, int], suffix_len: int, merge_size: int = 2) -> np.ndarray:
    """(3, length) M-RoPE position ids of one unpadded prompt: text runs count up on all three axes,
    the image's merged tokens get (t, h, w) grid positions offset by the text before them, and the text
    after resumes at offset + max(h, w). Same values as Qwen2.5-VL's get_rope_index, which loops over
    samples on the host (a sync per sample); here they come from the loader, cached per resolution."""
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    prefix = np.broadcast_to(np.arange(prefix_len), (3, prefix_len))
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + prefix_len
    start = prefix_len + max(h, w)
    suffix = np.broadcast_to(np.arange(start, start + suffix_len), (3, suffix_len))
    out = np.concatenate([prefix, image, suffix], axis=1)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=256)
def prompt_ids(prefix: tuple[int, ...], suffix: tuple[int, ...], image_token_id: int, n_image: int) -> torch.Tensor:
    """Token ids of one unpadded prompt with `n_image` image placeholders (cached per resolution)."""
    return torch.tensor([*prefix, *([image_token_id] * n_image), *suffix], dtype=torch.long)


class ClassificationCollator:
    """List of samples (a `failed` marker for an image that could not be loaded) -> one padded model batch."""

    def __init__(self, prompt: PromptTokens, merge_size: int = 2, padding_side: str = "left",
                 placeholder: tuple[torch.Tensor, tuple[int, int, int]] | None = None):
        self.prompt = prompt
        self.merge_size = merge_size
        self.merge_area = merge_size * merge_size
        self.padding_side = padding_side
        # An encoded blank image (patches, grid): stands in, with weight 0, for a batch whose every image
        # failed, so evaluation and predict go on (and every rank still runs its forward pass).
        self.placeholder = placeholder

    def __call__(self, samples: list[dict | None]) -> dict:
        kept = [s for s in samples if s is not None and not s.get("failed")]
        # Failed images of real rows (not an eval shard's weight-0 padding slots), by dataset.
        failed = [s["dataset_id"] for s in samples if s is not None and s.get("failed") and s.get("weight", 1.0) > 0]
        all_failed = not kept
        if all_failed:
            if self.placeholder is None:
                raise RuntimeError(f"all {len(samples)} images of a batch failed to load (see the warnings above)")
            patches, grid = self.placeholder
            kept = [{"pixel_values": patches, "grid": grid, "label": 0, "dataset_id": 0, "num_classes": 1,
                     "sample_id": -1, "weight": 0.0}]
        pre, suf = self.prompt.prefix, self.prompt.suffix
        lengths = [len(pre) + int(np.prod(s["grid"])) // self.merge_area + len(suf) for s in kept]
        width = max(lengths)
        input_ids = torch.full((len(kept), width), self.prompt.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(kept), width), dtype=torch.long)
        positions = np.zeros((3, len(kept), width), dtype=np.int64)  # padding keeps position 0, as upstream
        for row, (s, n) in enumerate(zip(kept, lengths, strict=True)):
            ids = prompt_ids(pre, suf, self.prompt.image_token_id, n - len(pre) - len(suf))
            start = width - n if self.padding_side == "left" else 0
            input_ids[row, start:start + n] = ids
            attention[row, start:start + n] = 1
            positions[:, row, start:start + n] = mrope_positions(len(pre), tuple(s["grid"]), len(suf), self.merge_size)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": torch.from_numpy(positions),
            "pixel_values": torch.cat([s["pixel_values"] for s in kept]),
            "image_grid_thw": torch.tensor([s["grid"] for s in kept], dtype=torch.long),
            "labels": torch.tensor([s["label"] for s in kept], dtype=torch.long),
            "dataset_ids": torch.tensor([s["dataset_id"] for s in kept], dtype=torch.long),
            "num_classes": torch.tensor([s["num_classes"] for s in kept], dtype=torch.long),
            "sample_ids": torch.tensor([s["sample_id"] for s in kept], dtype=torch.long),
            "weights": torch.tensor([s.get("weight", 1.0) for s in kept], dtype=torch.float32),
            "skipped": len(samples) - (0 if all_failed else len(kept)),
            "skipped_dataset_ids": torch.tensor(failed, dtype=torch.long),
            "all_failed": all_failed,  # a host-side flag: checking it costs no device sync
        }


def create_collator(model_dir: Path, model_cfg, tokenizer, prompt: str | None = None,
                    processor_config: dict | None = None) -> tuple[ImageEncoder, ClassificationCollator]:
    """The image encoder and collator for a model directory and the `model:` settings (one recipe for
    training, partial and full evaluation); `prompt` overrides model_cfg.prompt (e.g. a saved model's);
    `processor_config` (the backbone family's, see BackboneFamily.preprocessor_config) overrides the folder's file."""
    encoder = (ImageEncoder.from_config(processor_config, model_cfg.min_pixels, model_cfg.max_pixels)
               if processor_config is not None else
               ImageEncoder.from_pretrained(model_dir, model_cfg.min_pixels, model_cfg.max_pixels))
    tokens = PromptTokens.from_tokenizer(tokenizer, prompt or model_cfg.prompt)
    placeholder = encoder(Image.new("RGB", (224, 224)))
    return encoder, ClassificationCollator(tokens, encoder.merge_size, model_cfg.padding_side, placeholder)
