"""Qwen3.5: Qwen3-VL's vision tower (16-px patches, [-1, 1] normalisation, no DeepStack) in front of a
hybrid language model (Gated DeltaNet linear-attention layers between full-attention layers). On CPU
transformers runs the linear attention through its reference PyTorch code (slow but exact); on GPU,
`flash-linear-attention` and `causal-conv1d` are the fast kernels."""

from __future__ import annotations

from dataclasses import dataclass

from food_multids.model.backbones.base import BackboneFamily, special_token_ids, tiny_text


@dataclass(frozen=True)
class Qwen35(BackboneFamily):
    def tiny_config(self, tokenizer, hidden: int = 64):
        """One linear-attention and one full-attention layer, two vision blocks."""
        from transformers import Qwen3_5Config

        text = {**tiny_text(tokenizer, hidden), "head_dim": hidden // 4, "linear_key_head_dim": hidden // 4,
                "linear_value_head_dim": hidden // 4, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                "layer_types": ["linear_attention", "full_attention"], "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "mrope_section": [2, 3, 3],
                                    "mrope_interleaved": True, "partial_rotary_factor": 1.0}}
        vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4, out_hidden_size=hidden,
                      num_position_embeddings=64)
        return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **special_token_ids(tokenizer))


BACKBONE = Qwen35(model_type="qwen3_5", display_name="Qwen3.5", model_class_name="Qwen3_5Model",
                  lm_class_name="Qwen3_5ForConditionalGeneration", patch_size=16, image_mean=(0.5, 0.5, 0.5),
                  image_std=(0.5, 0.5, 0.5))
