"""The tiny demo backbone: a locally built tokenizer and a random-weight model of any supported family,
saved in Hub layout so that it loads through the same code as a real checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import Qwen2Tokenizer

from food_multids.model.backbones import DEFAULT, family

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


def build_tiny_model_dir(out: Path, *, family_name: str = DEFAULT, seed: int = 0, min_pixels: int | None = None,
                         max_pixels: int | None = None, hidden: int = 64) -> Path:
    """Write a tiny random-weight checkpoint of `family_name` laid out like a Hub download (model, tokenizer,
    image processor). Images default to one 2x2 group of merged patches (56x56 px for 14-px patches)."""
    backbone = family(family_name)
    side = backbone.patch_size * 2 * 2
    min_pixels = side * side if min_pixels is None else min_pixels
    max_pixels = side * side if max_pixels is None else max_pixels
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = backbone.lm_class()(backbone.tiny_config(tokenizer, hidden))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    backbone.image_processor(min_pixels, max_pixels).save_pretrained(out)
    n = sum(p.numel() for p in model.model.parameters())
    logger.info("Wrote tiny %s (%.2f M backbone parameters) to %s", backbone.display_name, n / 1e6, out)
    return out
