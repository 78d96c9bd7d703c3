"""Kedro's config loader with layered parameters: an environment overrides only the keys it names.

Kedro's default merge replaces each top-level section of `parameters` whole, so a seed YAML with just
`model.num_labels` in `conf/<env>/parameters.yml` silently drops every other `model:` key of base
(including `model.name_or_path`, which then falls back to the demo's tiny model). Here mappings are
merged key by key. Two things are still replaced whole, because merging them is never what is meant:

- lists (`train_jsonl_list: [a, b]` in an env is the list, not base's list extended), and
- the data files and their dataset descriptions, as one set: when an env names any of
  `data.train_jsonl_list`, `data.val_jsonl_list`, `data.train_jsonl`, `data.val_jsonl` or
  `datasets.dataset_configs`, base's values of all five are dropped. Otherwise the demo's two
  datasets would be added to the user's and the single-file form would clash with base's lists.
"""

from __future__ import annotations

import copy
from typing import Any

from kedro.config import OmegaConfigLoader

# (section, key) pairs that describe the data together: an env naming one replaces them all.
DATA_SET_KEYS = (("data", "train_jsonl_list"), ("data", "val_jsonl_list"), ("data", "train_jsonl"),
                 ("data", "val_jsonl"), ("datasets", "dataset_configs"))


def merge_mappings(base: Any, override: Any) -> Any:
    """`override` on top of `base`: mappings merged recursively, anything else (lists too) replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = merge_mappings(base[key], value) if key in base else copy.deepcopy(value)
    return merged


def layer_parameters(base: dict, env: dict) -> dict:
    """The run's parameters: base, with the env's keys on top (see the module docstring)."""
    names_data = any(isinstance(env.get(section), dict) and key in env[section] for section, key in DATA_SET_KEYS)
    if names_data:
        base = copy.deepcopy(base)
        for section, key in DATA_SET_KEYS:
            if isinstance(base.get(section), dict):
                base[section].pop(key, None)
    return merge_mappings(base, env)


class LayeredConfigLoader(OmegaConfigLoader):
    """OmegaConfigLoader whose `parameters` are layered (base, then the run env), other keys as Kedro does."""

    def _merge_configs(self, config: dict[str, Any], env_config: dict[str, Any], key: str, env_path: str) -> Any:
        if key == "parameters":
            return layer_parameters(config, env_config)
        return super()._merge_configs(config, env_config, key, env_path)
