"""Qwen3-VL: 16-px patches normalised to [-1, 1], learned position embeddings interpolated per image,
DeepStack (features of early vision blocks added to the first decoder layers, through their own
mergers: part of 'merger' here), interleaved M-RoPE over the same 3-D positions as Qwen2.5-VL."""

from __future__ import annotations

from dataclasses import dataclass

from food_multids.model.backbones.base import HUB_IDS, BackboneFamily, special_token_ids, tiny_text


def _config(text: dict, vision: dict, ids: dict, tie: bool):
    from transformers import Qwen3VLConfig

    text = {**text, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                "mrope_section": text.pop("mrope_section")}}
    vision = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh",
              **vision}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def _real(hidden: int, intermediate: int, tie: bool, depth: int, v_hidden: int, v_intermediate: int,
          deepstack: list[int]):
    text = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, mrope_section=[24, 20, 20])
    vision = dict(depth=depth, hidden_size=v_hidden, intermediate_size=v_intermediate, num_heads=16,
                  out_hidden_size=hidden, num_position_embeddings=2304, deepstack_visual_indexes=deepstack)
    return _config(text, vision, HUB_IDS, tie)


def config_4b():
    """The published Qwen3-VL-4B-Instruct shapes (about 4.44 B parameters)."""
    return _real(2560, 9728, True, 24, 1024, 4096, [5, 11, 17])


def config_8b():
    """The published Qwen3-VL-8B-Instruct shapes (about 8.77 B parameters with the LM head)."""
    return _real(4096, 12288, False, 27, 1152, 4304, [8, 16, 24])


@dataclass(frozen=True)
class Qwen3VL(BackboneFamily):
    def tiny_config(self, tokenizer, hidden: int = 64):
        """Two vision blocks (one feeding DeepStack) and two language layers."""
        text = {**tiny_text(tokenizer, hidden), "head_dim": hidden // 4, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        return _config(text, vision, special_token_ids(tokenizer), tie=True)


BACKBONE = Qwen3VL(model_type="qwen3_vl", display_name="Qwen3-VL", model_class_name="Qwen3VLModel",
                   lm_class_name="Qwen3VLForConditionalGeneration", patch_size=16, image_mean=(0.5, 0.5, 0.5),
                   image_std=(0.5, 0.5, 0.5), merger_prefixes=("visual.merger.", "visual.deepstack_merger_list."),
                   real_shapes={"Qwen3-VL-4B-Instruct": config_4b, "Qwen3-VL-8B-Instruct": config_8b})
