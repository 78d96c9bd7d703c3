"""Qwen2-VL: full attention per image in the vision tower, 14-px patches, CLIP normalisation."""

from __future__ import annotations

from dataclasses import dataclass

from food_multids.model.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    BackboneFamily,
    special_token_ids,
    tiny_text,
)


@dataclass(frozen=True)
class Qwen2VL(BackboneFamily):
    def tiny_config(self, tokenizer, hidden: int = 64):
        from transformers import Qwen2VLConfig

        text = {**tiny_text(tokenizer, hidden), "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
        vision = dict(depth=2, embed_dim=hidden, hidden_size=hidden, mlp_ratio=2, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **special_token_ids(tokenizer))


BACKBONE = Qwen2VL(model_type="qwen2_vl", display_name="Qwen2-VL", model_class_name="Qwen2VLModel",
                   lm_class_name="Qwen2VLForConditionalGeneration", patch_size=14, image_mean=CLIP_MEAN,
                   image_std=CLIP_STD)
