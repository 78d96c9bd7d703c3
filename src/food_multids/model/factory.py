"""Build or load the Qwen2.5-VL backbone, its tokenizer and processor.

A real checkpoint (e.g. Qwen2.5-VL-3B-Instruct downloaded beforehand) and the tiny demo model go
through the same `load_backbone(path)` / `load_processor(path)` code: both are local directories.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2Tokenizer,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Same layout as Qwen2-VL's template: one user turn holding the image then the question.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOKENIZER_CORPUS = (
    "What food is shown in this image? Which class does this picture belong to? Classify the image.",
    "system user assistant You are a helpful assistant. Answer with the name of the dish.",
    "pizza sushi ramen burger salad dumplings curry noodles rice soup cake bread steak fries tacos",
    "digit zero one two three four five six seven eight nine shape circle square triangle cross ring",
    "red green blue yellow purple orange cyan white black colour color food dish plate",
)


def build_tokenizer(vocab_size: int = 512) -> Qwen2Tokenizer:
    """A small byte-level BPE tokenizer with Qwen's special tokens, trained here on a fixed corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor settings (written to preprocessor_config.json like a Hub checkpoint)."""
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)


def tiny_config(tokenizer, hidden: int = 64) -> Qwen2_5_VLConfig:
    """Two vision blocks and two language layers; every module class of the real model is present."""
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                tie_word_embeddings=True)
    vision = dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1], hidden_act="silu", in_chans=3)
    return _qwen_config(tokenizer, text, vision)


def qwen2_5_vl_3b_config() -> Qwen2_5_VLConfig:
    """The published Qwen2.5-VL-3B-Instruct shapes (about 3.75 B parameters)."""
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1e6,
                rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                tie_word_embeddings=True)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_chans=3)
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def _qwen_config(tokenizer, text: dict, vision: dict) -> Qwen2_5_VLConfig:
    text = {**text, "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build_tiny_model_dir(out: Path, *, seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 56 * 56,
                         hidden: int = 64) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint laid out like a real Hub download (model + processor)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, hidden))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor(min_pixels, max_pixels).save_pretrained(out)
    n = sum(p.numel() for p in model.model.parameters())
    logger.info("Wrote tiny Qwen2.5-VL (%.2f M backbone parameters) to %s", n / 1e6, out)
    return out


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_backbone(path: Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Qwen2_5_VLModel:
    """The Qwen2.5-VL backbone (vision tower + language model, no LM head) from a local directory."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: {path} has no config.json; point it at a local "
                                "Qwen2.5-VL directory (e.g. a downloaded Qwen2.5-VL-3B-Instruct)")
    return Qwen2_5_VLModel.from_pretrained(path, local_files_only=True, dtype=dtype,
                                           attn_implementation=attn_implementation)


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer with a chat template (taken from chat_template.* when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            file = path / name
            if file.is_file():
                text = file.read_text()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise FileNotFoundError(f"{path}: the tokenizer has no chat template and no chat_template.jinja/.json")
    return tokenizer
