"""What a backbone family provides: the one interface the rest of the package talks to."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneFamily(ABC):
    """One family of Qwen vision-language backbones (the model without its LM head).

    The families share their input format: a chat prompt with one run of image tokens, flattened
    patches with a (t, h, w) grid, and 3-D M-RoPE positions computed by the collator (the same values
    as each family's get_rope_index: tested per family).
    """

    model_type: str
    display_name: str
    model_class_name: str                 # transformers class: vision tower + language model
    lm_class_name: str                    # the ...ForConditionalGeneration written by real checkpoints
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    merger_prefixes: tuple[str, ...] = ("visual.merger.",)
    # Batched equal-width window attention + cached vision indices (model/speedups.py) are written for
    # Qwen2.5-VL's windowed vision attention; elsewhere the setting is accepted and does nothing.
    batched_vision_windows: bool = False
    real_shapes: dict = field(default_factory=dict)   # name -> config builder, for the meta-device test

    # -- classes ---------------------------------------------------------------------------------
    def _transformers(self, name: str) -> type:
        import transformers

        return getattr(transformers, name)

    def model_class(self) -> type:
        return self._transformers(self.model_class_name)

    def lm_class(self) -> type:
        return self._transformers(self.lm_class_name)

    # -- loading and shape -----------------------------------------------------------------------
    def load(self, path: Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
        """The backbone from a local directory in Hub layout (a Hub download or a saved classifier)."""
        return self.model_class().from_pretrained(path, local_files_only=True, dtype=dtype,
                                                  attn_implementation=attn_implementation)

    def hidden_size(self, backbone: nn.Module) -> int:
        return backbone.config.text_config.hidden_size

    def image_token_id(self, backbone: nn.Module) -> int:
        return backbone.config.image_token_id

    def part_of(self, name: str) -> str:
        """'vision', 'merger' or 'language' for a backbone parameter name (freezing, learning rates)."""
        dotted = f".{name}"
        if any(f".{prefix}" in dotted for prefix in self.merger_prefixes):
            return "merger"
        return "vision" if ".visual." in dotted else "language"

    def blocks(self, backbone: nn.Module) -> list[nn.Module]:
        """The repeated blocks regional compilation and checkpointing work on."""
        return list(backbone.visual.blocks) + list(backbone.language_model.layers)

    # -- image processor ---------------------------------------------------------------------------
    def image_processor(self, min_pixels: int, max_pixels: int):
        """The family's image processor settings (as a Hub checkpoint's preprocessor_config.json)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=self.patch_size,
                                        temporal_patch_size=2, merge_size=2, image_mean=list(self.image_mean),
                                        image_std=list(self.image_std))

    def preprocessor_config(self, model_path: Path, min_pixels: int, max_pixels: int) -> dict:
        """The checkpoint's preprocessor_config.json with this run's pixel range, to save beside a model."""
        source = Path(model_path) / "preprocessor_config.json"
        if source.is_file():
            conf = json.loads(source.read_text())
        else:
            conf = self.image_processor(min_pixels, max_pixels).to_dict()
        conf.update(min_pixels=min_pixels, max_pixels=max_pixels)
        if "size" in conf:
            conf["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        return conf

    # -- the tiny demo model -------------------------------------------------------------------------
    @abstractmethod
    def tiny_config(self, tokenizer, hidden: int = 64):
        """A config of the family with two vision blocks and two language layers of width `hidden`."""


def special_token_ids(tokenizer) -> dict[str, int]:
    """The image/video token ids a config needs, read from the tokenizer."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def tiny_text(tokenizer, hidden: int) -> dict:
    """Two language layers of width `hidden`: the text settings every tiny family shares."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# Hub token ids of the Qwen VL tokenizers (real-size shapes only)
HUB_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
