"""A checkpoint's tokenizer (with its chat template) and the compute dtype. Backbones load through
their family: `model.backbones.family_of(path).load(path, dtype)`.

A real checkpoint (e.g. Qwen2.5-VL-3B-Instruct downloaded beforehand) and the tiny demo model
(model/tiny.py) go through the same code: both are local directories in Hub layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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
