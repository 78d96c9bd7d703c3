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
import re
from pathlib import Path
from typing import Any

import click
from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf
from yaml.parser import ParserError

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


# What the predict pipeline reads: a layer (env or --params) naming one replaces both, so a folder given on
# the command line is not predicted together with base's demo JSONL.
PREDICT_INPUT_KEYS = (("predict", "jsonl_list"), ("predict", "image_dir"))


def names_any(layer: dict, group: tuple[tuple[str, str], ...]) -> bool:
    return any(isinstance(layer.get(section), dict) and key in layer[section] for section, key in group)


def without(config: dict, group: tuple[tuple[str, str], ...]) -> dict:
    config = copy.deepcopy(config)
    for section, key in group:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    return config


def layer_parameters(base: dict, env: dict) -> dict:
    """The run's parameters: base, with the env's keys on top (see the module docstring)."""
    for group in (DATA_SET_KEYS, PREDICT_INPUT_KEYS):
        if names_any(env, group):
            base = without(base, group)
    return merge_mappings(base, env)


def apply_runtime_params(config: dict, runtime: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """`--params` on top of the layered parameters, key by key. A dotted override inside a value that is
    not a mapping (`deepspeed.zero_optimization.stage=3` where deepspeed is a JSON file's path) would
    silently replace that value: it is refused instead, and the problem returned."""
    merged, problems = copy.deepcopy(config), []
    for key, value in runtime.items():
        path = f"{prefix}{key}"
        here = merged.get(key)
        if isinstance(value, dict) and here is not None and not isinstance(here, dict):
            problems.append(f"--params {first_leaf(value, path)}: params:{path} is {here!r}, not a mapping, so "
                            f"nothing inside it can be overridden; change {path} itself (or the file it names)")
        elif isinstance(value, dict) and isinstance(here, dict):
            merged[key], inner = apply_runtime_params(here, value, f"{path}.")
            problems += inner
        else:
            merged[key] = copy.deepcopy(value)
    return merged, problems


def first_leaf(value: Any, path: str) -> str:
    """`a.b.c=1` for {'b': {'c': 1}} under 'a': how the override was written on the command line."""
    while isinstance(value, dict) and value:
        key = next(iter(value))
        path, value = f"{path}.{key}", value[key]
    return f"{path}={value}"


class ConfigFileError(click.ClickException):
    """A configuration file that is not valid YAML: file, 1-based line and column, what the parser saw."""


KEDRO_YAML_ERROR = re.compile(r"Invalid YAML or JSON file (?P<path>.+), unable to read line")


class LayeredConfigLoader(OmegaConfigLoader):
    """OmegaConfigLoader whose `parameters` are layered: base, then the run env, then `--params`.

    Kedro merges `--params` into each layer before merging the layers; here they are applied once, at
    the end, so that an override of one data key is not taken for an env that names the data set.
    Problems found while applying them are kept in `layer_problems` for the checks before the first node.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_problems: list[str] = []

    def __getitem__(self, key: str) -> dict[str, Any]:
        try:
            config = super().__getitem__(key)
        except ParserError as exc:
            raise yaml_error(exc) from exc
        if key == "parameters" and self.runtime_params:
            runtime = OmegaConf.to_container(OmegaConf.create(dict(self.runtime_params)), resolve=True)
            if names_any(runtime, PREDICT_INPUT_KEYS):
                config = without(config, PREDICT_INPUT_KEYS)
            config, self.layer_problems = apply_runtime_params(config, runtime)
        return config

    def _merge_and_resolve(self, key: str, config_per_file: dict) -> dict[str, Any]:
        if key != "parameters" or not config_per_file:
            return super()._merge_and_resolve(key, config_per_file)
        return OmegaConf.to_container(OmegaConf.unsafe_merge(*config_per_file.values()), resolve=True)

    def _merge_configs(self, config: dict[str, Any], env_config: dict[str, Any], key: str, env_path: str) -> Any:
        if key == "parameters":
            return layer_parameters(config, env_config)
        return super()._merge_configs(config, env_config, key, env_path)


def yaml_error(exc: ParserError) -> ConfigFileError:
    """Kedro's message counts lines from 0 and drops the parser's explanation: give both right."""
    found = KEDRO_YAML_ERROR.match(str(exc))
    original = exc.__context__
    mark = getattr(original, "problem_mark", None)
    if not found or mark is None:
        return ConfigFileError(str(exc))
    # resolve(): `food-multids train --config FILE` reads FILE through a link in a temporary conf folder
    # (console.config_as_env) that is gone when the message is read: name the user's own file.
    path = Path(found["path"]).resolve()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    parts = (getattr(original, "context", None), getattr(original, "problem", None))
    what = " ".join(str(part) for part in parts if part)
    return ConfigFileError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({what})")
