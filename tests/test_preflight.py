"""The checks run before the first node: each problem found, all of them at once, named for the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from food_multids.preflight import (
    PreflightError,
    RunPlan,
    check_model_source,
    check_run,
    check_writable_dir,
    demo_model_warning,
    makers_of,
)

TRAIN_NODES = {"ingest_jsonl", "merge_and_tag", "split_eval_subsets", "train_deepspeed", "select_best"}


def plan(nodes=TRAIN_NODES, env="seed", inputs=(), outputs=None) -> RunPlan:
    return RunPlan(env=env, node_names=set(nodes), free_inputs=list(inputs), output_paths=outputs or {})


def no_catalog(name: str) -> bool:
    return False


def test_a_valid_training_run_passes(demo_params):
    found = check_run(plan(), demo_params, no_catalog, {}, no_catalog)
    assert found.problems == [] and found.warnings == []


def test_every_problem_is_found_at_once_with_the_env_named(demo_params, tmp_path):
    params = json.loads(json.dumps(demo_params))
    params["data"]["train_jsonl_list"][1] = str(tmp_path / "missing/train.jsonl")
    params["training"]["metric_for_best_model"] = "digits_acc"
    params["model"]["name_or_path"] = str(tmp_path / "no-such-model")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    params["training"]["output_dir"] = str(blocker / "out")
    found = check_run(plan(), params, no_catalog, {}, no_catalog)
    text = "\n".join(found.problems)
    assert f"params:data.train_jsonl_list[1] file not found: {tmp_path / 'missing/train.jsonl'}" in text
    assert "params:training.metric_for_best_model is 'digits_acc', which the partial evaluation does not produce: " \
           "did you mean 'digits_accuracy'?" in text
    assert f"params:model.name_or_path {tmp_path / 'no-such-model'} does not exist" in text
    assert f"params:training.output_dir: {blocker} is a file, not a folder" in text
    assert len(found.problems) == 4
    message = str(PreflightError(found.problems, "gpu"))
    assert message.startswith("4 problem(s) before the first node (parameters: conf/base/parameters.yml, then "
                              "conf/gpu/parameters.yml and --params):\n  - params:")


def test_input_files_are_only_required_when_the_data_nodes_run(demo_params, tmp_path):
    params = json.loads(json.dumps(demo_params))
    params["data"]["train_jsonl_list"][0] = str(tmp_path / "gone.jsonl")
    eval_only = plan(nodes={"full_evaluate", "report"}, inputs=["best_model", "full_eval_set"])
    found = check_run(eval_only, params, lambda name: True, {}, lambda name: Path("/nowhere"))
    assert not [p for p in found.problems if "file not found" in p]


def test_a_missing_catalog_input_names_the_command_that_makes_it(demo_params):
    eval_only = plan(nodes={"full_evaluate", "report"}, inputs=["best_model", "full_eval_set"])
    makers = {"best_model": "kedro run --pipelines train", "full_eval_set": "kedro run --pipelines data"}
    found = check_run(eval_only, demo_params, no_catalog, makers, no_catalog)
    assert found.problems == [
        "the catalog dataset 'best_model' has no saved version yet: make it with `kedro run --pipelines train` first",
        "the catalog dataset 'full_eval_set' has no saved version yet: make it with `kedro run --pipelines data` first",
    ]


def test_makers_are_read_from_the_registered_pipelines():
    from food_multids.pipeline_registry import register_pipelines

    wanted = ["best_model", "full_eval_set", "eval_metrics", "nothing"]
    # train also runs the data nodes: one command makes both best_model and full_eval_set
    assert makers_of(register_pipelines(), wanted) == {
        "best_model": "kedro run --pipelines train", "full_eval_set": "kedro run --pipelines train",
        "eval_metrics": "kedro run --pipelines full_eval"}
    assert makers_of(register_pipelines(), ["best_model"], "gpu") == {"best_model": "kedro run --env gpu --pipelines train"}


def test_full_eval_alone_checks_the_saved_models_label_spaces(demo_params, tiny_model_dir, tmp_path):
    from food_multids.model.classifier import CLASSIFIER_FILE, ClassifierMeta, LabelSpace

    model = tmp_path / "clf"
    model.mkdir()
    meta = ClassifierMeta(num_labels=40, pooling="image_mean",
                          label_spaces={"digits": LabelSpace(0, 10), "letters": LabelSpace(1, 26)})
    (model / CLASSIFIER_FILE).write_text(meta.to_json())
    eval_only = plan(nodes={"full_evaluate", "report"}, inputs=["best_model", "full_eval_set"])
    found = check_run(eval_only, demo_params, lambda name: True, {}, lambda name: model)
    assert len(found.problems) == 1 and "was trained on the label spaces digits (#0, 10 classes), letters" in found.problems[0]


def test_only_training_reads_the_model_path(demo_params):
    params = json.loads(json.dumps(demo_params))
    params["model"]["name_or_path"] = "data/06_models/tiny_qwen2_5_vl"  # the demo model, in env 'seed'
    eval_only = plan(nodes={"full_evaluate", "report"}, inputs=["best_model"])
    found = check_run(eval_only, {**params, "model": {**params["model"], "name_or_path": "/nope"}},
                      lambda name: True, {}, lambda name: Path("/nowhere"))
    assert not [p for p in found.problems if "name_or_path" in p]
    assert check_run(eval_only, params, lambda name: True, {}, lambda name: Path("/nowhere")).warnings == []
    assert check_run(plan(), params, no_catalog, {}, no_catalog).warnings  # training it: warned


def test_the_model_folder_needs_a_config_of_a_supported_family(tmp_path, tiny_model_dir):
    assert check_model_source(str(tiny_model_dir)) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in check_model_source(str(empty))[0]
    (empty / "config.json").write_text("{not json")
    assert "is not a readable JSON object" in check_model_source(str(empty))[0]
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert check_model_source(str(empty)) == [f"params:model.name_or_path {empty} holds a 'llama' model "
                                              "(config.json model_type); supported: qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_5"]


def test_an_output_folder_that_cannot_be_created_is_named(tmp_path):
    assert check_writable_dir(tmp_path / "new/deeper", "x") == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert check_writable_dir(blocker / "sub", "the catalog dataset 'y'") == [
        f"the catalog dataset 'y': {blocker} is a file, not a folder"]


@pytest.mark.parametrize(("env", "path", "warned"), [
    ("gpu", "data/06_models/tiny_qwen2_5_vl", True),
    ("seed", "data/06_models/./tiny_qwen2_5_vl/../tiny_qwen2_5_vl", True),  # the same folder, spelled otherwise
    ("local", "data/06_models/tiny_qwen2_5_vl", False),
    ("base", "data/06_models/tiny_qwen2_5_vl", False),
    ("gpu", "/models/Qwen2.5-VL-3B-Instruct", False),
])
def test_the_demo_model_outside_base_and_local_is_a_loud_warning(env, path, warned):
    warning = demo_model_warning(env, path)
    assert (warning is not None) == warned
    if warned:
        assert f"the '{env}' environment runs with model.name_or_path" in warning
        assert f"conf/{env}/parameters.yml" in warning


def test_a_lora_target_module_typo_is_found_before_the_first_node(demo_params):
    params = {**demo_params, "model": {**demo_params["model"], "finetuning": "lora",
                                        "lora": {"target_modules": ["q_prj", "v_proj"]}}}
    found = check_run(plan(), params, no_catalog, {}, no_catalog)
    [problem] = [p for p in found.problems if "target_modules" in p]
    assert "params:model.lora.target_modules ['q_prj'] match no Linear layer" in problem
    assert "q_proj" in problem  # the valid names are listed
    fine = {**params, "model": {**params["model"], "lora": {"target_modules": ["q_proj", "v_proj"]}}}
    assert not [p for p in check_run(plan(), fine, no_catalog, {}, no_catalog).problems if "target_modules" in p]
