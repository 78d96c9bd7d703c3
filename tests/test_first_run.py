"""A user's first real run, as `kedro run` processes in a copy of the project: the seed YAML in an env,
checks before the first node, and MLflow runs that read well."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import kedro, kedro_env


def run_count(root: Path) -> int:
    store = root / "mlflow.db"
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return db.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0


def write_env(root: Path, name: str, params: dict) -> None:
    (root / "conf" / name).mkdir()
    (root / "conf" / name / "parameters.yml").write_text(yaml.safe_dump(params))


@pytest.mark.e2e
def test_configuration_problems_stop_the_run_before_any_node_and_any_mlflow_run(project_copy):
    write_env(project_copy, "seed", {
        "model": {"num_labels": 2000, "enable_logits_masking": True},
        "data": {"train_jsonl_list": ["/data/food101/train.jsonl", "/data/food2k/train.jsonl"],
                 "val_jsonl_list": ["/data/food101/test.jsonl", "/data/food2k/test.jsonl"]},
        "datasets": {"dataset_configs": {"food101": {"num_classes": 101, "eval_ratio": 0.2},
                                         "food2k": {"num_classes": 2000, "eval_ratio": 0.1}}},
        "training": {"metric_for_best_model": "food2k_acc"},
    })
    proc = kedro(project_copy, "--env", "seed", "--params", "model.name_or_path=/models/Qwen2.5-VL-3B-Instruct")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert ("Error: 6 problem(s) before the first node (parameters: conf/base/parameters.yml, then "
            "conf/seed/parameters.yml and --params):") in out
    for line in ("params:data.train_jsonl_list[0] file not found: /data/food101/train.jsonl",
                 "params:data.val_jsonl_list[1] file not found: /data/food2k/test.jsonl",
                 "params:training.metric_for_best_model is 'food2k_acc', which the partial evaluation does not "
                 "produce: did you mean 'food2k_accuracy'?",
                 "params:model.name_or_path /models/Qwen2.5-VL-3B-Instruct does not exist"):
        assert line in out, line
    assert "Running node" not in out and not (project_copy / "data/02_intermediate").exists()
    assert run_count(project_copy) == 0

    proc = kedro(project_copy, "--pipelines", "full_eval")  # nothing trained yet in this project
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert ("the catalog dataset 'best_model' has no saved version yet: make it with `kedro run --pipelines train` "
            "first") in out
    assert ("the catalog dataset 'full_eval_set' has no saved version yet: make it with "
            "`kedro run --pipelines train`") in out
    assert run_count(project_copy) == 0


@pytest.mark.e2e
def test_a_seed_env_on_the_demo_layers_on_base_and_its_runs_are_named_linked_and_pinnable(project_copy, base_params):
    demo = "data/01_raw/demo"
    write_env(project_copy, "seed", {
        "model": {"num_labels": 40},
        "data": {"train_jsonl_list": [f"{demo}/digits/train.jsonl", f"{demo}/shapes/train.jsonl"],
                 "val_jsonl_list": [f"{demo}/digits/val.jsonl", f"{demo}/shapes/val.jsonl"]},
        "datasets": {"dataset_configs": {"digits": {"num_classes": 10, "eval_ratio": 0.3},
                                         "shapes": {"num_classes": 40, "eval_ratio": 0.5}}},
        "training": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 2},
    })
    env = {**kedro_env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc = kedro(project_copy, "--env", "seed", "--pipelines", "data", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert run_count(project_copy) == 0  # data-only runs open no MLflow run

    first = kedro(project_copy, "--env", "seed", "--pipelines", "train", env=env)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    demo_model = (project_copy / "data/06_models/tiny_qwen2_5_vl").resolve()
    assert (f"the 'seed' environment runs with model.name_or_path = {demo_model}, the demo's random tiny model: set "
            "model.name_or_path in conf/seed/parameters.yml") in out
    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    [train_run] = client.search_runs([client.get_experiment_by_name("food_multids").experiment_id])
    assert train_run.info.run_name.startswith("train · seed · tiny_qwen2_5_vl · ")
    assert train_run.data.tags["food_multids.env"] == "seed"
    logged = train_run.data.params
    # kedro-mlflow logs each section a node takes (params:model, ...) under its own name, flattened.
    assert logged["model.pooling"] == str(base_params["model"]["pooling"])  # kept from base
    assert float(logged["training.learning_rate"]) == base_params["training"]["learning_rate"]
    assert logged["datasets.dataset_configs.digits.eval_ratio"] == "0.3" and logged["training.max_steps"] == "4"
    assert logged["predict.top_k"] == str(base_params["predict"]["top_k"])  # every section, each once
    assert not [key for key in logged if key.startswith("parameters.")]
    assert any(key.startswith("system/cpu_utilization") for key in train_run.data.metrics)

    second = kedro(project_copy, "--env", "seed", "--pipelines", "train", env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    versions = sorted(p.name for p in (project_copy / "data/06_models/best_model").iterdir())
    assert len(versions) == 2
    # Each training run registered its served model: a new version each time, under the env's own name.
    registered = sorted(int(v.version) for v in client.search_model_versions("name='food_multids-seed'"))
    assert registered == [1, 2] and not client.search_model_versions("name='food_multids'")
    runs_before = run_count(project_copy)
    # The predict pipeline on the first registered version (an MLflow URI in predict.model).
    predicted = kedro(project_copy, "--env", "seed", "--pipelines", "predict", "--params",
                      "predict.model=models:/food_multids-seed/1", env=env)
    assert predicted.returncode == 0, (predicted.stdout + predicted.stderr)[-3000:]
    table = sorted((project_copy / "data/07_model_output/image_predictions.parquet").iterdir())[-1]
    import pandas as pd

    frame = pd.read_parquet(table / "image_predictions.parquet")
    assert len(frame) == 100 and (frame["dataset_name"] == "digits").all() and frame["error"].isna().all()
    assert run_count(project_copy) == runs_before  # predictions live in the catalog, not in an MLflow run
    missing = kedro(project_copy, "--env", "seed", "--pipelines", "predict", "--params",
                    "predict.model=models:/food_multids-seed/9", env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "params:predict.model 'models:/food_multids-seed/9'" in missing.stdout + missing.stderr
    # The README's `kedro run --pipelines predict` (env local) reads the seed env's newest model: said, not hidden.
    readme_predict = kedro(project_copy, "--pipelines", "predict", env=env)
    out = readme_predict.stdout + readme_predict.stderr
    assert readme_predict.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert "trained in the 'seed' environment (this run: 'local')" in out
    # Today's parameters differ from the training's: only the model's own record describes it.
    pinned = kedro(project_copy, "--env", "seed", "--pipelines", "full_eval", "--load-versions",
                   f"best_model:{versions[0]}", "--params", "model.name_or_path=/nope,training.learning_rate=0.5",
                   env=env)
    out = pinned.stdout + pinned.stderr
    assert pinned.returncode == 0, out[-3000:]
    assert "not from best_model_info's run" not in out  # the info of the pinned run came with it
    runs = {r.info.run_id: r for r in client.search_runs([train_run.info.experiment_id])}
    [eval_run] = [r for r in runs.values() if r.info.run_name.startswith("full_eval · seed · ")]
    assert eval_run.data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert eval_run.data.tags["food_multids.training_run_id"] == train_run.info.run_id
    assert client.get_run(train_run.info.run_id).data.tags["food_multids.eval_run_id"] == eval_run.info.run_id
    report = sorted((project_copy / "data/08_reporting/report.md").iterdir())[-1] / "report.md"
    summary = report.read_text()
    assert f"| MLflow training run | {train_run.info.run_id} |" in summary
    assert f"| MLflow run of this report | {eval_run.info.run_id} |" in summary
    assert f"| evaluated model | {(project_copy / 'data/06_models/best_model' / versions[0]).resolve()}" in summary
    assert "| git commit | (not a git checkout) |" in summary
    assert f"| backbone (model.name_or_path) | {demo_model} |" in summary
    assert "| Kedro env (training / this report) | seed / seed |" in summary
    assert eval_run.info.run_name.startswith("full_eval · seed · tiny_qwen2_5_vl · ")
    page = (sorted((project_copy / "data/08_reporting/report.html").iterdir())[-1] / "report.html").read_text()
    assert f"<td>{base_params['training']['learning_rate']} / cosine</td>" in page and "0.5 / cosine" not in page
    saved = project_copy / f"data/06_models/training_history.json/{versions[0]}/training_history.json"
    history = json.loads(saved.read_text())
    assert history["records"], "the pinned run's history"


@pytest.mark.e2e
def test_a_yaml_error_and_an_override_that_cannot_apply_are_reported_without_a_traceback(project_copy):
    (project_copy / "conf/broken").mkdir()
    (project_copy / "conf/broken/parameters.yml").write_text("model:\n  num_labels: 4\n   prompt: [\n")
    proc = kedro(project_copy, "--env", "broken")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "conf/broken/parameters.yml:3:10: not valid YAML (mapping values are not allowed in this context)" in out

    (project_copy / "conf/dsfile").mkdir()
    (project_copy / "conf/dsfile/ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (project_copy / "conf/dsfile/parameters.yml").write_text("deepspeed: conf/dsfile/ds.json\n")
    proc = kedro(project_copy, "--env", "dsfile", "--pipelines", "data", "--params",
                 "deepspeed.zero_optimization.stage=3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert ("--params deepspeed.zero_optimization.stage=3: params:deepspeed is 'conf/dsfile/ds.json', not a mapping"
            in out)
    assert not (project_copy / "data/02_intermediate").exists()
