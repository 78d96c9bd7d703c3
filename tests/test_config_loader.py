"""Layered parameters: an environment overrides only the keys it names."""

from __future__ import annotations

import yaml

from food_multids.config_loader import layer_parameters, merge_mappings

SEED = """
model:
  num_labels: 2000
  enable_logits_masking: true
data:
  train_jsonl_list: ["/data/food101/train.jsonl", "/data/food2k/train.jsonl"]
  val_jsonl_list: ["/data/food101/test.jsonl", "/data/food2k/test.jsonl"]
datasets:
  dataset_configs:
    food101: {num_classes: 101, eval_ratio: 0.2}
    food2k: {num_classes: 2000, eval_ratio: 0.1}
"""


def test_a_seed_yaml_keeps_every_base_key_it_does_not_name(base_params):
    merged = layer_parameters(base_params, yaml.safe_load(SEED))
    assert merged["model"]["num_labels"] == 2000
    for key in ("name_or_path", "pooling", "prompt", "min_pixels", "torch_dtype"):
        assert merged["model"][key] == base_params["model"][key], key
    assert merged["training"] == base_params["training"]
    assert merged["deepspeed"] == base_params["deepspeed"]
    assert merged["data"]["check_images"] == base_params["data"]["check_images"]


def test_the_data_files_and_dataset_configs_are_replaced_as_one_set(base_params):
    merged = layer_parameters(base_params, yaml.safe_load(SEED))
    assert list(merged["datasets"]["dataset_configs"]) == ["food101", "food2k"]  # no digits/shapes mixed in
    assert merged["data"]["train_jsonl_list"] == ["/data/food101/train.jsonl", "/data/food2k/train.jsonl"]
    single = layer_parameters(base_params, {"data": {"train_jsonl": "/d/f/train.jsonl", "val_jsonl": "/d/f/val.jsonl"}})
    assert "train_jsonl_list" not in single["data"] and "dataset_configs" not in single["datasets"]
    assert single["data"]["train_jsonl"] == "/d/f/train.jsonl"
    untouched = layer_parameters(base_params, {"training": {"learning_rate": 1e-5}})
    assert untouched["datasets"] == base_params["datasets"] and untouched["data"] == base_params["data"]
    assert untouched["training"]["learning_rate"] == 1e-5
    assert untouched["training"]["num_train_epochs"] == base_params["training"]["num_train_epochs"]


def test_lists_and_changed_types_are_replaced_and_inputs_are_not_modified():
    base = {"a": {"x": [1, 2], "y": {"p": 1, "q": 2}}, "ds": {"zero_optimization": {"stage": 2}}}
    env = {"a": {"x": [3], "y": {"q": 5}}, "ds": "conf/gpu/ds.json"}
    assert merge_mappings(base, env) == {"a": {"x": [3], "y": {"p": 1, "q": 5}}, "ds": "conf/gpu/ds.json"}
    assert base["a"]["y"] == {"p": 1, "q": 2} and base["ds"] == {"zero_optimization": {"stage": 2}}
    assert layer_parameters(base, {}) == base
