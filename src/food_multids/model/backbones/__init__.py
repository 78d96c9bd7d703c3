"""Backbone families behind one seam: Qwen2.5-VL (default), Qwen2-VL, Qwen3-VL, Qwen3.5.

`model.name_or_path`'s config.json (`model_type`) picks the family. The classifier, collator, loop,
evaluation and `prepare_model` ask the family (a `BackboneFamily`, see base.py) for everything specific to
it: how to load it, its hidden size and image token, which parameters are vision / merger / language,
its image processor settings, and which speed-ups apply. This module imports no torch: the checks
before the first node use `SUPPORTED` and `model_type_of` only.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

SUPPORTED = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5")
DEFAULT = "qwen2_5_vl"


class UnsupportedBackboneError(ValueError):
    """A checkpoint whose model_type has no family here."""


def model_type_of(path: Path) -> str | None:
    """The checkpoint's config.json model_type (None when there is no readable config.json)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def family(model_type: str):
    """The BackboneFamily of a model_type; an error listing the supported ones otherwise."""
    if model_type not in SUPPORTED:
        raise UnsupportedBackboneError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return importlib.import_module(f"food_multids.model.backbones.{model_type}").BACKBONE


def family_of(path: Path):
    """The BackboneFamily of the checkpoint in `path` (its config.json model_type)."""
    model_type = model_type_of(path)
    if model_type is None:
        raise FileNotFoundError(f"model.name_or_path: {path} has no readable config.json; point it at a local "
                                "Hugging Face folder (e.g. a downloaded Qwen2.5-VL-3B-Instruct)")
    try:
        return family(model_type)
    except UnsupportedBackboneError as exc:
        raise UnsupportedBackboneError(f"model.name_or_path: {path} holds a {exc}") from None
