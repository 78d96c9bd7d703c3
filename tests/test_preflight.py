"""The checks run before the first node: each problem found, all of them at once, named for the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from food_multids.framework.preflight import (
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
    assert makers_of(register_pipelines(), ["best_model"],
                     "gpu") == {"best_model": "kedro run --env gpu --pipelines train"}


def test_full_eval_alone_checks_the_saved_models_label_spaces(demo_params, tiny_model_dir, tmp_path):
    from food_multids.model.classifier import CLASSIFIER_FILE, ClassifierMeta, LabelSpace

    model = tmp_path / "clf"
    model.mkdir()
    meta = ClassifierMeta(num_labels=40, pooling="image_mean",
                          label_spaces={"digits": LabelSpace(0, 10), "letters": LabelSpace(1, 26)})
    (model / CLASSIFIER_FILE).write_text(meta.to_json())
    eval_only = plan(nodes={"full_evaluate", "report"}, inputs=["best_model", "full_eval_set"])
    found = check_run(eval_only, demo_params, lambda name: True, {}, lambda name: model)
    assert len(found.problems) == 1
    assert "was trained on the label spaces digits (#0, 10 classes), letters" in found.problems[0]


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
                                              "(config.json model_type); supported: qwen2_5_vl, qwen2_vl, qwen3_vl, "
                                              "qwen3_5"]


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


def saved_model(folder: Path, spaces: dict[str, int], env: str | None) -> Path:
    from food_multids.model.classifier import CLASSIFIER_FILE, TRAINING_INFO, ClassifierMeta, LabelSpace

    folder.mkdir()
    meta = ClassifierMeta(num_labels=max(spaces.values()), pooling="image_mean",
                          label_spaces={name: LabelSpace(i, n) for i, (name, n) in enumerate(spaces.items())})
    (folder / CLASSIFIER_FILE).write_text(meta.to_json())
    (folder / TRAINING_INFO).write_text(json.dumps({"step": 4} if env is None else {"step": 4, "kedro_env": env}))
    return folder


PREDICT_NODES = {"ingest_images", "predict"}


def predict_params(demo_params, demo_root) -> dict:
    params = json.loads(json.dumps(demo_params))
    params["predict"].update(jsonl_list=[str(demo_root / "digits/val.jsonl"), str(demo_root / "shapes/val.jsonl")],
                             image_dir=None)
    return params


def test_predict_with_a_model_of_another_envs_datasets_is_one_line_naming_that_env(demo_params, demo_root, tmp_path):
    # `kedro run --env mine` trained on food + drinks; then the README's `kedro run --pipelines predict` (env local)
    model = saved_model(tmp_path / "best", {"food": 12, "drinks": 2}, "mine")
    found = check_run(plan(nodes=PREDICT_NODES, env="local", inputs=["best_model"]),
                      predict_params(demo_params, demo_root),
                      lambda name: True, {}, lambda name: model)
    [problem] = found.problems
    assert "knows the label spaces food, drinks" in problem and "'digits' in params:predict.jsonl_list[0]" in problem
    assert "'shapes' in params:predict.jsonl_list[1]" in problem
    assert "trained in the 'mine' environment" in problem and "`kedro run --env mine --pipelines predict`" in problem


def test_predict_with_a_fitting_model_of_another_env_is_a_warning(demo_params, demo_root, tmp_path):
    model = saved_model(tmp_path / "best", {"digits": 10, "shapes": 40}, "mine")
    params = predict_params(demo_params, demo_root)
    found = check_run(plan(nodes=PREDICT_NODES, env="local", inputs=["best_model"]), params, lambda name: True, {},
                      lambda name: model)
    assert found.problems == []
    assert len(found.warnings) == 1
    assert "trained in the 'mine' environment" in found.warnings[0]
    same_env = check_run(plan(nodes=PREDICT_NODES, env="mine", inputs=["best_model"]), params, lambda name: True, {},
                         lambda name: model)
    assert same_env.problems == [] and same_env.warnings == []


def test_predict_dataset_name_unknown_to_a_model_without_a_recorded_env(demo_params, demo_root, tmp_path):
    model = saved_model(tmp_path / "best", {"digits": 10, "shapes": 40}, None)
    params = predict_params(demo_params, demo_root)
    params["predict"].update(jsonl_list=[], image_dir=str(demo_root / "digits"), dataset_name="digitz")
    found = check_run(plan(nodes=PREDICT_NODES, env="local", inputs=["best_model"]), params, lambda name: True, {},
                      lambda name: model)
    [problem] = found.problems
    assert "'digitz' in params:predict.dataset_name" in problem
    assert "set predict.jsonl_list / predict.dataset_name" in problem


def test_full_eval_of_another_envs_model_names_that_env(demo_params, tmp_path):
    model = saved_model(tmp_path / "best", {"food": 12, "drinks": 2}, "mine")
    eval_only = plan(nodes={"full_evaluate", "report"}, env="local", inputs=["best_model", "full_eval_set"])
    [problem] = check_run(eval_only, demo_params, lambda name: True, {}, lambda name: model).problems
    assert "trained in the 'mine' environment" in problem and "`kedro run --env mine --pipelines full_eval`" in problem


def test_select_best_records_the_training_env_in_the_model(tmp_path):
    from food_multids.framework.run_context import set_run_env
    from food_multids.pipelines.train.nodes import select_best

    model = saved_model(tmp_path / "best", {"digits": 10}, None)
    (model / "config.json").write_text("{}")
    manifest = {"best": {"metric": "overall_accuracy", "value": 0.5, "step": 4, "greater_is_better": True,
                         "path": str(model)}, "final_step": 4}
    set_run_env("mine")
    try:
        _, info = select_best({"datasets": ["digits"]}, manifest)
    finally:
        set_run_env(None)
    assert info["kedro_env"] == "mine"
    assert json.loads((model / "training_info.json").read_text()) == {"step": 4, "kedro_env": "mine"}


def test_an_env_that_names_the_demo_model_itself_is_not_warned(tmp_path):
    conf = tmp_path / "conf"
    (conf / "ci").mkdir(parents=True)
    (conf / "ci/parameters.yml").write_text("model:\n  name_or_path: data/06_models/tiny_qwen2_5_vl\n")
    (conf / "gpu").mkdir()
    (conf / "gpu/parameters.yml").write_text("training:\n  max_steps: 4\n")
    assert demo_model_warning("ci", "data/06_models/tiny_qwen2_5_vl", str(conf)) is None  # chosen on purpose
    assert "conf/gpu/parameters.yml" in demo_model_warning("gpu", "data/06_models/tiny_qwen2_5_vl", str(conf))


def test_predict_reject_below_that_does_not_fit_the_model_is_found_before_any_image(demo_params, demo_root, tmp_path):
    model = saved_model(tmp_path / "best", {"digits": 10, "shapes": 40}, "local")  # saved without calibration
    params = predict_params(demo_params, demo_root)
    params["predict"]["reject_below"] = "auto"
    [problem] = check_run(plan(nodes=PREDICT_NODES, env="local", inputs=["best_model"]), params, lambda name: True, {},
                          lambda name: model).problems
    assert "predict.reject_below (--reject-below) is auto but the model has no fitted threshold" in problem
    params["predict"]["reject_below"] = {"numbers": 0.5}
    [problem] = check_run(plan(nodes=PREDICT_NODES, env="local", inputs=["best_model"]), params, lambda name: True, {},
                          lambda name: model).problems
    assert "names ['numbers'], which are not label spaces of the model (digits, shapes)" in problem
