from __future__ import annotations

import copy
import json

import pytest

from food_multids.config import ConfigError, ProjectConfig
from tests.conftest import with_overrides, write_jsonl


def problems_of(params) -> list[str]:
    with pytest.raises(ConfigError) as info:
        ProjectConfig.from_params(params)
    return info.value.problems


def test_seed_yaml_is_accepted_as_is(tmp_path):
    for ds in ("food101", "food2k"):
        for split in ("train", "test"):
            write_jsonl(tmp_path / ds / f"{split}.jsonl", [{"image": "x.jpg", "label": 0, "dataset_name": ds}])
    params = {
        "model": {"num_labels": 2000, "enable_logits_masking": True},
        "data": {"train_jsonl_list": [str(tmp_path / "food101/train.jsonl"), str(tmp_path / "food2k/train.jsonl")],
                 "val_jsonl_list": [str(tmp_path / "food101/test.jsonl"), str(tmp_path / "food2k/test.jsonl")]},
        "datasets": {"dataset_configs": {"food101": {"num_classes": 101, "eval_ratio": 0.2},
                                         "food2k": {"num_classes": 2000, "eval_ratio": 0.1}}},
    }
    cfg = ProjectConfig.from_params(params)
    assert cfg.dataset_names == ("food101", "food2k")
    assert cfg.num_classes() == {"food101": 101, "food2k": 2000}
    assert cfg.dataset("food2k").eval_ratio == 0.1 and cfg.dataset("food2k").index == 1
    assert cfg.data.train_files[1] == tmp_path / "food2k/train.jsonl"


def test_single_file_form_derives_dataset_from_folder(tmp_path):
    write_jsonl(tmp_path / "food101/train.jsonl", [{"image": "a.jpg", "label": 3}])
    write_jsonl(tmp_path / "food101/test.jsonl", [{"image": "b.jpg", "label": 4}])
    cfg = ProjectConfig.from_params({
        "model": {"num_labels": 101},
        "data": {"train_jsonl": str(tmp_path / "food101/train.jsonl"),
                 "val_jsonl": str(tmp_path / "food101/test.jsonl")},
    })
    assert cfg.data.single_file
    assert cfg.num_classes() == {"food101": 101}


def test_num_labels_below_largest_num_classes(two_datasets):
    params = with_overrides(two_datasets, model={"num_labels": 4})
    expected = "model.num_labels must be >= the largest num_classes (5, dataset 'beta')"
    assert any(expected in p for p in problems_of(params))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_eval_ratio_outside_range(two_datasets, ratio):
    params = copy.deepcopy(two_datasets)
    params["datasets"]["dataset_configs"]["alpha"]["eval_ratio"] = ratio
    expected = "params:datasets.dataset_configs.alpha.eval_ratio must be in (0, 1]"
    assert any(p.startswith(expected) for p in problems_of(params))


def test_list_lengths_must_match(two_datasets):
    params = copy.deepcopy(two_datasets)
    params["data"]["val_jsonl_list"] = params["data"]["val_jsonl_list"][:1]
    assert any("data.val_jsonl_list has 1 file(s) but data.train_jsonl_list has 2" in p for p in problems_of(params))


def test_unknown_keys_get_a_did_you_mean(two_datasets):
    params = with_overrides(two_datasets, training={"learnig_rate": 1e-4}, model={"poolng": "last"})
    params["trainng"] = {}
    found = problems_of(params)
    assert "params:training.learnig_rate is not a known setting (did you mean 'learning_rate'?)" in found
    assert "params:model.poolng is not a known setting (did you mean 'pooling'?)" in found
    assert "params:trainng is not a known setting (did you mean 'training'?)" in found


def test_missing_files_are_named(two_datasets, tmp_path):
    params = copy.deepcopy(two_datasets)
    params["data"]["train_jsonl_list"][1] = str(tmp_path / "nope/train.jsonl")
    assert any(p.startswith("params:data.train_jsonl_list[1] file not found") and "nope/train.jsonl" in p
               for p in problems_of(params))


def test_dataset_folder_not_in_configs_is_reported(two_datasets):
    params = copy.deepcopy(two_datasets)
    params["datasets"]["dataset_configs"]["alpah"] = params["datasets"]["dataset_configs"].pop("alpha")
    found = problems_of(params)
    expected = "lives in folder 'alpha', which is not in datasets.dataset_configs (did you mean 'alpah'?)"
    assert any(expected in p for p in found)


def test_all_problems_are_reported_at_once(two_datasets):
    params = with_overrides(two_datasets, model={"num_labels": 0, "pooling": "max"},
                            training={"eval_steps": 0, "learning_rate": "fast", "resume_from_checkpoint": True})
    found = problems_of(params)
    assert len(found) >= 5
    assert "params:training.eval_steps must be > 0, got 0" in found
    assert "params:model.pooling must be one of 'last', 'image_mean', got 'max'" in found
    assert "params:training.learning_rate must be a number, got 'fast'" in found
    assert any(p.startswith("params:training.resume_from_checkpoint") for p in found)


def test_deepspeed_config_from_a_json_file(two_datasets, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = ProjectConfig.from_params({**two_datasets, "deepspeed": str(tmp_path / "ds.json")})
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    (tmp_path / "bad.json").write_text("{not json")
    assert any("is not valid JSON" in p for p in problems_of({**two_datasets, "deepspeed": str(tmp_path / "bad.json")}))


def test_yaml_scientific_notation_strings_are_numbers(two_datasets):
    cfg = ProjectConfig.from_params(with_overrides(two_datasets, training={"learning_rate": "1e-4"}))
    assert cfg.training.learning_rate == pytest.approx(1e-4)


def test_greater_is_better_is_inferred_from_the_metric_name(two_datasets):
    cfg = ProjectConfig.from_params(with_overrides(two_datasets, training={"metric_for_best_model": "overall_loss"}))
    assert cfg.training.best_metric_greater_is_better() is False
    cfg = ProjectConfig.from_params(with_overrides(two_datasets, training={"metric_for_best_model": "beta_accuracy"}))
    assert cfg.training.best_metric_greater_is_better() is True


def test_project_defaults_parse(base_params, demo_root, monkeypatch):
    params = copy.deepcopy(base_params)
    params["data"]["train_jsonl_list"] = [str(demo_root / "digits/train.jsonl"), str(demo_root / "shapes/train.jsonl")]
    params["data"]["val_jsonl_list"] = [str(demo_root / "digits/val.jsonl"), str(demo_root / "shapes/val.jsonl")]
    cfg = ProjectConfig.from_params(params)
    assert cfg.num_classes() == {"digits": 10, "shapes": 40}


def test_the_gpu_environment_parses(base_params):
    import yaml

    from food_multids.framework.config_loader import layer_parameters
    from tests.conftest import REPO

    gpu = yaml.safe_load((REPO / "conf/gpu/parameters.yml").read_text())
    cfg = ProjectConfig.from_params(layer_parameters(base_params, gpu), check_files=False)
    assert cfg.model.torch_dtype == "bfloat16" and cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.num_classes() == {"food101": 101, "food2k": 2000} and cfg.model.num_labels == 2000


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("training", "dataloader_num_workers", "two",
     "params:training.dataloader_num_workers must be an integer, got 'two'"),
    ("data", "mix_temperature", 0, "params:data.mix_temperature must be > 0"),
    ("training", "max_grad_norm", -1.0, "params:training.max_grad_norm must be >= 0"),
    ("training", "weight_decay", -0.1, "params:training.weight_decay must be >= 0"),
    ("training", "warmup_steps", -5, "params:training.warmup_steps must be >= 0"),
    ("evaluation", "report_thumbnails", -1, "params:evaluation.report_thumbnails must be >= 0"),
    ("data", "max_image_pixels", 10, "params:data.max_image_pixels must be between 784 and"),
])
def test_values_that_used_to_crash_later_are_config_errors(two_datasets, section, key, value, expected):
    # Each of these passed validation before and crashed in a node (TypeError, ZeroDivisionError, ...).
    params = with_overrides(two_datasets, **{section: {key: value}})
    found = problems_of(params)
    assert any(p.startswith(expected) for p in found), found
    assert len(found) == 1, found  # a wrong type is reported once, not again as a crash in a range check


@pytest.mark.parametrize("name", ["food 101", "food/101", "overall", "ä-food", "-food"])
def test_dataset_names_mlflow_would_reject_are_config_errors(two_datasets, name):
    params = copy.deepcopy(two_datasets)
    configs = params["datasets"]["dataset_configs"]
    configs[name] = configs.pop("alpha")
    assert any(p.startswith(f"params:datasets.dataset_configs.{name} is not a usable dataset name")
               for p in problems_of(params))


def test_top_k_counts_only_datasets_with_more_classes(two_datasets):
    cfg = ProjectConfig.from_params(with_overrides(two_datasets, evaluation={"top_k": 3}))
    assert [d.name for d in cfg.topk_datasets()] == ["beta"]


def test_base_parameters_document_every_setting_the_config_accepts(base_params):
    """conf/base/parameters.yml is the reference: every accepted key is there, and nothing else."""
    import dataclasses

    from food_multids.config import (
        TOP_LEVEL_KEYS,
        DataConfig,
        DatasetSpec,
        EvalConfig,
        ModelConfig,
        PredictConfig,
        TrackingConfig,
        TrainConfig,
    )

    def accepted(cls, skip=()):
        return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip}

    assert set(base_params) == set(TOP_LEVEL_KEYS)
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("training", TrainConfig),
                         ("evaluation", EvalConfig), ("tracking", TrackingConfig), ("predict", PredictConfig)):
        assert set(base_params[section]) == accepted(cls), section
    assert set(base_params["datasets"]) == {"dataset_configs"}
    for name, entry in base_params["datasets"]["dataset_configs"].items():
        assert set(entry) == accepted(DatasetSpec, skip=("name", "index")), name


def test_the_best_model_metric_must_be_one_evaluation_produces(two_datasets):
    problems = problems_of(with_overrides(two_datasets, training={"metric_for_best_model": "beta_acc"}))
    assert problems == ["params:training.metric_for_best_model is 'beta_acc', which the partial evaluation does not "
                        "produce: did you mean 'beta_accuracy'? choose one of alpha_accuracy, alpha_loss, "
                        "beta_accuracy, beta_loss, overall_accuracy, overall_loss"]
    assert problems_of(with_overrides(two_datasets, training={"metric_for_best_model": "out_of_range_predictions"}))
    unmasked = with_overrides(two_datasets, model={"num_labels": 5, "enable_logits_masking": False},
                              training={"metric_for_best_model": "out_of_range_predictions",
                                        "greater_is_better": False})
    assert ProjectConfig.from_params(unmasked).training.metric_for_best_model == "out_of_range_predictions"
    inferred = with_overrides(unmasked, training={"metric_for_best_model": "out_of_range_predictions"})
    assert ProjectConfig.from_params(inferred).training.best_metric_greater_is_better() is False  # fewer is better


def test_a_config_turns_back_into_the_parameters_it_came_from(two_datasets, tmp_path):
    cfg = ProjectConfig.from_params(with_overrides(two_datasets, training={"learning_rate": 0.3}))
    recorded = json.loads(json.dumps(cfg.to_params()))  # as written into training_info.json
    assert ProjectConfig.from_params(recorded) == cfg
    assert recorded["datasets"]["dataset_configs"]["beta"]["eval_ratio"] == 0.25


def test_a_config_records_the_sections_it_was_given_not_defaults_for_the_others(two_datasets):
    # What a node took (the training node: no predict section) is what its model and trackers record.
    taken = {k: v for k, v in with_overrides(two_datasets, training={"seed": 7}).items() if k != "predict"}
    recorded = ProjectConfig.from_params(taken).to_params()
    assert "predict" not in recorded and recorded["training"]["seed"] == 7
    assert set(recorded) == set(taken) | {"datasets"}
    whole = ProjectConfig.from_params({**two_datasets, "predict": {"top_k": 3}}).to_params()
    assert whole["predict"]["top_k"] == 3


def test_a_config_error_names_the_environments_files():
    assert "(conf/base/parameters.yml, then conf/gpu/parameters.yml and --params):" in str(ConfigError(["x"], "gpu"))
    assert "(conf/base/parameters.yml and --params):" in str(ConfigError(["x"], "base"))
    assert "<env>" not in str(ConfigError(["x"]))
    assert "(conf/base/parameters.yml (conf/nowhere has no parameters file) and --params):" in \
        str(ConfigError(["x"], "nowhere"))


@pytest.mark.parametrize("env", ["gpu", "gpu-qwen2_5_vl-7b", "gpu-qwen2_vl-7b", "gpu-qwen3_vl-4b", "gpu-qwen3_vl-8b",
                                 "gpu-lora", "gpu-lora-qwen2_5_vl-7b"])
def test_every_gpu_preset_parses_on_top_of_base(base_params, env):
    import yaml

    from food_multids.framework.config_loader import layer_parameters
    from tests.conftest import REPO

    preset = yaml.safe_load((REPO / "conf" / env / "parameters.yml").read_text())
    cfg = ProjectConfig.from_params(layer_parameters(base_params, preset), check_files=False)
    assert cfg.model.torch_dtype == "bfloat16" and cfg.training.device == "cuda"
    assert cfg.num_classes() == {"food101": 101, "food2k": 2000}
    assert cfg.model.min_pixels >= 32 * 32  # one patch group of every family


def test_the_predict_section_parses_alone_and_names_its_bad_values():
    from food_multids.config import ConfigError, PredictConfig

    assert PredictConfig.from_section({"top_k": 3, "jsonl_list": ["a.jsonl"]}).jsonl_list == ("a.jsonl",)
    with pytest.raises(ConfigError) as err:
        PredictConfig.from_section({"top_k": 0, "batch_sise": 4, "on_bad_rows": "ignore"})
    text = str(err.value)
    assert "params:predict.top_k must be >= 1, got 0" in text
    assert "batch_sise" in text and "batch_size" in text  # unknown key with its did-you-mean
    assert "predict.on_bad_rows" in text


def test_a_key_in_the_wrong_section_is_pointed_to_the_right_one(base_params):
    params = copy.deepcopy(base_params)
    params["training"]["report_to"] = ["wandb"]  # where Hugging Face's TrainingArguments has it
    params["data"]["step_size"] = 2.0
    params["model"]["learning_rat"] = 1e-4
    params["training"]["seeed"] = 1
    with pytest.raises(ConfigError) as raised:
        ProjectConfig.from_params(params, check_files=False)
    problems = raised.value.problems
    assert ("params:training.report_to is not a known setting here; it is a setting of tracking.report_to: "
            "move it there") in problems
    assert ("params:data.step_size is not a known setting here; it is a setting of data.mix_adaptive.step_size: "
            "move it there") in problems
    assert "params:model.learning_rat is not a known setting here (did you mean 'training.learning_rate'?)" in problems
    assert "params:training.seeed is not a known setting (did you mean 'seed'?)" in problems
