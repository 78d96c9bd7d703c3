"""tracking.report_to: MLflow, WandB (offline) and TensorBoard get the same metrics; the original
trainer's YAML through `food-multids ... --config` is the same run as `kedro run --env`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from food_multids.config import ConfigError, ProjectConfig
from tests.conftest import KEDRO, kedro_env, latest, with_overrides

FOOD_MULTIDS = str(Path(KEDRO).with_name("food-multids"))


def test_an_unknown_or_missing_tracker_is_a_config_error_that_says_what_to_install(two_datasets, monkeypatch):
    with pytest.raises(ConfigError) as info:
        ProjectConfig.from_params(with_overrides(two_datasets, tracking={"report_to": ["mlflow", "wandbb"]}))
    assert info.value.problems == ["params:tracking.report_to[1] is 'wandbb': did you mean 'wandb'? supported: "
                                   "mlflow, wandb, tensorboard"]
    real = importlib.util.find_spec
    # The package cannot be uninstalled here: hide it from the lookup the check makes.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        ProjectConfig.from_params(with_overrides(two_datasets, tracking={"report_to": ["wandb"]}))
    assert info.value.problems == ["params:tracking.report_to[0] is 'wandb', but the wandb package is not installed: "
                                   "pip install -e '.[wandb]' (or make setup EXTRAS=wandb)"]


def mlflow_metrics(store: Path, run_id: str) -> dict[tuple[str, int], float]:
    client = MlflowClient(f"sqlite:///{store}")
    return {(key, m.step): m.value for key in client.get_run(run_id).data.metrics if not key.startswith("system/")
            for m in client.get_metric_history(run_id, key)}


def tensorboard_metrics(folder: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def wandb_records(path: Path):
    """The records of a .wandb file: LevelDB-log framing (7-byte header, 32 KiB blocks, full/first/middle/last)."""
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_run_folders(folder: Path, run_id: str) -> list[Path]:
    """The offline folders of one WandB run, oldest first. Two inits of the run within the same second (the
    re-rank, then the full evaluation, on a fast machine) get `...-<id>` and `...-<id>-1`."""
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(match, path) for path in folder.iterdir() if (match := pattern.fullmatch(path.name))]
    return [path for match, path in sorted(found, key=lambda item: (item[0][1], int(item[0][2] or 0)))]


def wandb_metrics(folder: Path, run_id: str) -> dict[tuple[str, int], float]:
    from wandb.proto import wandb_internal_pb2

    out = {}
    for path in (run / f"run-{run_id}.wandb" for run in wandb_run_folders(folder, run_id)):
        for raw in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or ".".join(item.nested_key)
                    if not key.startswith("_"):
                        out[(key, record.history.step.num)] = json.loads(item.value_json)
    return out


SEED_ON_DEMO = {  # the README's seed YAML, on the demo's data
    "model": {"num_labels": 40, "enable_logits_masking": True},
    "data": {"train_jsonl_list": ["data/01_raw/demo/digits/train.jsonl", "data/01_raw/demo/shapes/train.jsonl"],
             "val_jsonl_list": ["data/01_raw/demo/digits/val.jsonl", "data/01_raw/demo/shapes/val.jsonl"]},
    "datasets": {"dataset_configs": {"digits": {"num_classes": 10, "eval_ratio": 0.5},
                                     "shapes": {"num_classes": 40, "eval_ratio": 0.5}}},
    "training": {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 2},
    "tracking": {"report_to": ["mlflow", "wandb", "tensorboard"]},
}


@pytest.mark.e2e
def test_the_trainers_yaml_runs_as_an_env_and_every_tracker_gets_the_same_metrics(project_copy, tmp_path):
    config = tmp_path / "multi_datasets_config.yaml"
    config.write_text(yaml.safe_dump(SEED_ON_DEMO))
    env = {**kedro_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([FOOD_MULTIDS, "run", "--config", str(config)], cwd=project_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"Parameters: conf/base/parameters.yml, then {config} (as Kedro env 'multi_datasets_config')" in out
    store = project_copy / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("food_multids").experiment_id])
    run_id = run.info.run_id
    logged = mlflow_metrics(store, run_id)
    reranked = json.loads(latest(project_copy, "data/06_models/candidate_evals.json").read_text())["reranked"]
    final = 6 if reranked else 5  # after the training's last step (4), and after the re-rank's scores (5)
    assert ("final_eval_overall_accuracy", final) in logged and ("train_digits_loss", 2) in logged
    if reranked:
        assert any(key.startswith("final_eval_candidate_") and step == 5 for key, step in logged)
    assert ("eval_overall_accuracy", 4) in logged and any(k[0] == "best_model_step" for k in logged)
    output = project_copy / "data/06_models/train_output"
    for name, other in (("tensorboard", tensorboard_metrics(output / "tensorboard" / run_id)),
                        ("wandb", wandb_metrics(output / "wandb", run_id))):
        assert set(other) == set(logged), name
        for key, value in logged.items():
            assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key)

    lone = subprocess.run([FOOD_MULTIDS, "full-eval", "--config", str(config)], cwd=project_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert lone.returncode == 0, (lone.stdout + lone.stderr)[-3000:]
    folders = wandb_run_folders(output / "wandb", run_id)
    # Training, the re-rank of its candidates (when there were several), the run's full evaluation, and
    # this one: all the same WandB run.
    assert len(folders) == (4 if reranked else 3)
    assert ("final_eval_overall_accuracy", final) in wandb_metrics(output / "wandb", run_id)
    (project_copy / "conf/seed").mkdir()
    shutil.copy(config, project_copy / "conf/seed/parameters.yml")
    proc = subprocess.run([KEDRO, "run", "--env", "seed", "--pipelines", "train"], cwd=project_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.run_id != run_id
    assert runs[0].data.params == client.get_run(run_id).data.params  # the same resolved parameters


def test_closing_the_trackers_closes_every_one_even_when_one_fails(two_datasets, tmp_path, caplog):
    from food_multids.tracking import Trackers
    from food_multids.tracking.sinks import TensorboardSink

    cfg = ProjectConfig.from_params(with_overrides(two_datasets, training={"output_dir": str(tmp_path / "out")},
                                                   tracking={"report_to": ["tensorboard"]}))
    trackers = Trackers(cfg, "run-1", None)
    [board] = trackers.sinks

    class Broken:  # a tracker whose close raises (a network error, a full disk)
        def close(self, failed: bool = False) -> None:
            raise OSError("disk full")

    trackers.sinks = [Broken(), board]
    trackers.close(failed=True)
    assert isinstance(board, TensorboardSink) and board.writer.file_writer is None  # closed all the same
    assert "Closing the Broken tracker failed: disk full" in caplog.text and trackers.sinks == []
