"""Layered parameters: an environment overrides only the keys it names."""

from __future__ import annotations

import yaml

from food_multids.framework.config_loader import layer_parameters, merge_mappings

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


def write_conf(root, files: dict[str, str]):
    for relative, text in files.items():
        path = root / "conf" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "conf"


def loader(conf, env, runtime=None):
    from food_multids.framework.config_loader import LayeredConfigLoader

    return LayeredConfigLoader(str(conf), env=env, runtime_params=runtime or {}, base_env="base",
                               default_run_env="local")


BASE = """
data:
  train_jsonl_list: [a/train.jsonl]
  val_jsonl_list: [a/val.jsonl]
datasets:
  dataset_configs:
    a: {num_classes: 3, eval_ratio: 0.5}
deepspeed:
  zero_optimization: {stage: 2}
"""


def test_params_on_the_command_line_apply_last_and_do_not_count_as_the_env_naming_the_data(tmp_path):
    conf = write_conf(tmp_path, {"base/parameters.yml": BASE, "lr/parameters.yml": "training: {learning_rate: 0.1}\n"})
    runtime = {"datasets": {"dataset_configs": {"a": {"eval_ratio": 0.2}}}}
    params = loader(conf, "lr", runtime)["parameters"]
    assert params["data"]["train_jsonl_list"] == ["a/train.jsonl"]  # not dropped as if the env named the data
    assert params["datasets"]["dataset_configs"]["a"] == {"num_classes": 3, "eval_ratio": 0.2}
    assert params["training"]["learning_rate"] == 0.1
    assert loader(conf, "base", {"training": {"seed": 3}})["parameters"]["training"] == {"seed": 3}


def test_an_override_inside_a_file_path_is_refused_not_applied(tmp_path):
    conf = write_conf(tmp_path, {"base/parameters.yml": BASE, "ds/parameters.yml": "deepspeed: conf/ds/ds.json\n"})
    layered = loader(conf, "ds", {"deepspeed": {"zero_optimization": {"stage": 3}}})
    assert layered["parameters"]["deepspeed"] == "conf/ds/ds.json"
    assert layered.layer_problems == [
        "--params deepspeed.zero_optimization.stage=3: params:deepspeed is 'conf/ds/ds.json', not a mapping, so "
        "nothing inside it can be overridden; change deepspeed itself (or the file it names)"]


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    import pytest

    from food_multids.framework.config_loader import ConfigFileError

    conf = write_conf(tmp_path, {"base/parameters.yml": BASE,
                                 "bad/parameters.yml": "model:\n  num_labels: 4\n   prompt: [\n"})
    with pytest.raises(ConfigFileError) as info:
        loader(conf, "bad")["parameters"]
    assert info.value.message.endswith("bad/parameters.yml:3:10: not valid YAML (mapping values are not allowed "
                                       "in this context)")


def test_the_predict_inputs_are_replaced_as_one_pair_by_an_env_or_the_command_line(tmp_path):
    base = BASE + "predict: {jsonl_list: [demo/val.jsonl], image_dir: null, top_k: 5}\n"
    conf = write_conf(tmp_path,
                      {"base/parameters.yml": base, "photos/parameters.yml": "predict: {image_dir: /photos}\n"})
    from_env = loader(conf, "photos", {})["parameters"]["predict"]
    assert from_env == {"image_dir": "/photos", "top_k": 5}  # base's demo JSONL is not predicted as well
    from_cli = loader(conf, "base", {"predict": {"image_dir": "/more"}})["parameters"]["predict"]
    assert from_cli == {"image_dir": "/more", "top_k": 5}
    both = loader(conf, "base", {"predict": {"image_dir": "/more", "jsonl_list": ["x.jsonl"]}})["parameters"]["predict"]
    assert both == {"image_dir": "/more", "jsonl_list": ["x.jsonl"], "top_k": 5}
    assert loader(conf, "base", {"predict": {"top_k": 3}})["parameters"]["predict"]["jsonl_list"] == ["demo/val.jsonl"]


def test_a_yaml_error_in_a_config_file_names_the_users_file_not_the_temporary_link(tmp_path):
    import pytest

    from food_multids.console import config_as_env
    from food_multids.framework.config_loader import ConfigFileError

    root = tmp_path / "project"
    write_conf(root, {"base/parameters.yml": BASE})
    mine = tmp_path / "my_trainer.yaml"
    mine.write_text("model:\n  num_labels: 4\n   prompt: [\n")
    with config_as_env(root, mine) as (conf_source, env), pytest.raises(ConfigFileError) as info:
        loader(conf_source, env)["parameters"]
    assert f"{mine.resolve()}:3:10: not valid YAML" in info.value.message
    assert "food-multids-conf-" not in info.value.message
