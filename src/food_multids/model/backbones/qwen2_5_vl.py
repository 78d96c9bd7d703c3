"""Qwen2.5-VL: windowed vision attention (batched here), 14-px patches, CLIP normalisation."""

from __future__ import annotations

from dataclasses import dataclass

from food_multids.model.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    HUB_IDS,
    BackboneFamily,
    special_token_ids,
    tiny_text,
)


def _config(text: dict, vision: dict, ids: dict, tie: bool):
    from transformers import Qwen2_5_VLConfig

    text = {**text, "rope_theta": 1e6, "tie_word_embeddings": tie}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def _vision(depth: int, hidden: int, intermediate: int, heads: int, out: int, full: list[int]) -> dict:
    return dict(depth=depth, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads, out_hidden_size=out,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=full, hidden_act="silu", in_chans=3)


def config_3b():
    """The published Qwen2.5-VL-3B-Instruct shapes (about 3.75 B parameters)."""
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return _config(text, _vision(32, 1280, 3420, 16, 2048, [7, 15, 23, 31]), HUB_IDS, tie=True)


def config_7b():
    """The published Qwen2.5-VL-7B-Instruct shapes (about 8.29 B parameters with the LM head)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return _config(text, _vision(32, 1280, 3420, 16, 3584, [7, 15, 23, 31]), HUB_IDS, tie=False)


@dataclass(frozen=True)
class Qwen25VL(BackboneFamily):
    def tiny_config(self, tokenizer, hidden: int = 64):
        """Two vision blocks and two language layers; every module class of the real model is present."""
        text = {**tiny_text(tokenizer, hidden), "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
        return _config(text, _vision(2, hidden, 2 * hidden, 4, hidden, [1]), special_token_ids(tokenizer), tie=True)


BACKBONE = Qwen25VL(model_type="qwen2_5_vl", display_name="Qwen2.5-VL", model_class_name="Qwen2_5_VLModel",
                    lm_class_name="Qwen2_5_VLForConditionalGeneration", patch_size=14, image_mean=CLIP_MEAN,
                    image_std=CLIP_STD, batched_vision_windows=True,
                    real_shapes={"Qwen2.5-VL-3B-Instruct": config_3b, "Qwen2.5-VL-7B-Instruct": config_7b})
