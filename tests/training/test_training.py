"""Real DeepSpeed training of the tiny Qwen2.5-VL on the demo data, on CPU."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from food_multids.pipelines import node_sections
from food_multids.pipelines.data.nodes import run_data_nodes
from food_multids.pipelines.train.nodes import select_best, train_deepspeed
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import make_separable_dataset

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("driver.py")
REPO = Path(__file__).resolve().parents[2]


def data_nodes(params):
    train_set, _, subset, full = run_data_nodes(params)
    return train_set, subset, full


def metric_history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_training_logs_per_dataset_metrics_tracks_the_best_and_prunes_checkpoints(demo_params, tmp_path):
    params = demo_params
    params["training"].update(num_train_epochs=4, logging_steps=10, eval_steps=40, save_steps=40, save_total_limit=1,
                              best_model_selection="point")  # the strictly-better rule: best == max of the evals
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    total = manifest["total_steps"]
    assert total == 44 * 4
    train_steps = [s for s, _ in metric_history(client, run.info.run_id, "train_overall_loss")]
    expected = list(range(10, total + 1, 10))
    assert train_steps == (expected if total % 10 == 0 else [*expected, total])
    for key in ("train_digits_loss", "train_shapes_accuracy", "train_overall_accuracy", "train_overall_samples",
                "train_learning_rate", "train_images_per_second", "train_digits_share"):
        assert metric_history(client, run.info.run_id, key), key
    eval_steps = [s for s, _ in metric_history(client, run.info.run_id, "eval_overall_accuracy")]
    assert eval_steps == [40, 80, 120, 160, total]
    samples = dict(metric_history(client, run.info.run_id, "eval_overall_samples"))
    assert samples[40] == 130.0  # the whole eval subset: 50 digits + 80 shapes
    # Equal eval ratios (0.5, 0.5): the stratified overall estimate is the pooled one, with its interval.
    for step, record in ((r["step"], r["metrics"]) for r in history["records"] if r["kind"] == "eval"):
        assert record["overall_accuracy"] == record["overall_accuracy_pooled"]
        for name in ("digits", "shapes", "overall"):
            assert record[f"{name}_accuracy_ci_low"] <= record[f"{name}_accuracy"] <= record[f"{name}_accuracy_ci_high"]
    assert metric_history(client, run.info.run_id, "eval_overall_accuracy_ci_low")[0][0] == 40
    window = dict(metric_history(client, run.info.run_id, "train_overall_samples"))
    assert window[10] == 10 * 16
    best = manifest["best"]
    assert dict(metric_history(client, run.info.run_id, f"best_{best['metric']}"))[best["step"]] == best["value"]
    assert dict(metric_history(client, run.info.run_id, "best_model_step"))[best["step"]] == best["step"]
    evals = {r["step"]: r["metrics"]["overall_accuracy"] for r in history["records"] if r["kind"] == "eval"}
    assert best["value"] == max(evals.values()) and evals[best["step"]] == best["value"]
    kept = [s for s, _ in complete_checkpoints(Path(manifest["output_dir"]))]
    assert total in kept and (best["step"] in kept) and len(kept) <= 2
    path, info = select_best(history, manifest)
    assert (path / "classifier.json").is_file() and info["step"] == best["step"]
    assert info["mlflow_run_id"] == run.info.run_id


def test_training_learns_a_separable_two_dataset_set(base_params, tiny_model_dir, tmp_path):
    # One saturated colour per class: learnable by any working model/loss/optimizer, far from chance
    # on every machine (a margin, not one CPU's float trajectory).
    for name, n in (("alpha", 3), ("beta", 6)):
        for split in ("train", "val"):
            make_separable_dataset(tmp_path / "data", name, n, per_class=6, split=split)
    params = copy.deepcopy(base_params)
    params["model"].update(name_or_path=str(tiny_model_dir), num_labels=6)
    params["data"]["train_jsonl_list"] = [str(tmp_path / f"data/{d}/train.jsonl") for d in ("alpha", "beta")]
    params["data"]["val_jsonl_list"] = [str(tmp_path / f"data/{d}/val.jsonl") for d in ("alpha", "beta")]
    params["datasets"]["dataset_configs"] = {"alpha": {"num_classes": 3, "eval_ratio": 1.0},
                                             "beta": {"num_classes": 6, "eval_ratio": 1.0}}
    params["training"].update(output_dir=str(tmp_path / "out"), progress_bar="never", per_device_train_batch_size=9,
                              max_steps=60, logging_steps=20, eval_steps=30, save_steps=60)
    history, _ = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    evals = [r["metrics"] for r in history["records"] if r["kind"] == "eval"]
    # Chance: 1/3 (alpha) and 1/6 (beta).
    assert evals[-1]["alpha_accuracy"] >= 0.9 and evals[-1]["beta_accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["overall_loss"] < 0.5 * math.log(6), evals[-1]


@pytest.mark.parametrize("loss", [{"type": "focal", "focal_gamma": 2.0, "label_smoothing": 0.1},
                                  {"type": "class_balanced", "class_balanced_beta": 0.99},
                                  {"type": "ce", "class_weights": "auto"}])
def test_each_training_loss_learns_and_logs_its_objective_beside_the_plain_loss(base_params, tiny_model_dir, tmp_path,
                                                                                 loss):
    # An imbalanced separable set (alpha: 6, 2, 2 training images per class) under each objective.
    for split in ("train", "val"):
        make_separable_dataset(tmp_path / "data", "alpha", 3, per_class=6, split=split)
    train = tmp_path / "data/alpha/train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    kept = [r for r in rows if r["label"] == 0 or r["image"].endswith(("_0.png", "_1.png"))]
    train.write_text("".join(json.dumps(r) + "\n" for r in kept))
    params = copy.deepcopy(base_params)
    params["model"].update(name_or_path=str(tiny_model_dir), num_labels=3)
    params["data"].update(train_jsonl_list=[str(train)], val_jsonl_list=[str(tmp_path / "data/alpha/val.jsonl")])
    params["datasets"]["dataset_configs"] = {"alpha": {"num_classes": 3, "eval_ratio": 1.0}}
    params["training"].update(output_dir=str(tmp_path / "out"), progress_bar="never", per_device_train_batch_size=8,
                              max_steps=60, logging_steps=20, eval_steps=60, save_steps=60, loss=loss)
    history, _ = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    windows = [r["metrics"] for r in history["records"] if r["kind"] == "train"]
    assert all("alpha_objective" in w and "overall_objective" in w for w in windows)
    assert windows[0]["alpha_objective"] != pytest.approx(windows[0]["alpha_loss"], rel=1e-3)  # another objective
    final = [r["metrics"] for r in history["records"] if r["kind"] == "eval"][-1]
    assert final["alpha_accuracy"] >= 0.9, final  # chance: 1/3


def test_the_weight_average_is_what_evaluation_scores_and_the_best_model_saves(base_params, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    for name, n in (("alpha", 3),):
        for split in ("train", "val"):
            make_separable_dataset(tmp_path / "data", name, n, per_class=6, split=split)
    params = copy.deepcopy(base_params)
    params["model"].update(name_or_path=str(tiny_model_dir), num_labels=3)
    params["data"].update(train_jsonl_list=[str(tmp_path / "data/alpha/train.jsonl")],
                          val_jsonl_list=[str(tmp_path / "data/alpha/val.jsonl")])
    params["datasets"]["dataset_configs"] = {"alpha": {"num_classes": 3, "eval_ratio": 1.0}}
    params["training"].update(output_dir=str(tmp_path / "out"), progress_bar="never", per_device_train_batch_size=6,
                              max_steps=40, logging_steps=20, eval_steps=40, save_steps=40,
                              ema={"decay": 0.8, "start_step": 5})
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    final = [r["metrics"] for r in history["records"] if r["kind"] == "eval"][-1]
    assert final["alpha_accuracy"] >= 0.9, final  # the average of a converging run still separates
    checkpoint = Path(manifest["checkpoints"][-1]["path"])
    state = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)
    assert state["ema"]["averaged_steps"] == 40 - 5
    raw_head = state["module"]["head.weight"]
    best_head = load_file(Path(manifest["best"]["path"]) / "classifier_head.safetensors")["weight"]
    assert not torch.allclose(best_head, raw_head)  # the best model is not the trained weights ...
    # ... but their average
    assert any(s.shape == best_head.shape and torch.allclose(s, best_head) for s in state["ema"]["shadow"])


def test_minimised_metric_and_early_stopping(demo_params):
    # learning_rate 0 forces a plateau on every machine: the weights never move, so every partial
    # evaluation gives the same loss, the first one stays the best and patience runs out two evals later.
    params = demo_params
    params["training"].update(max_steps=60, logging_steps=5, eval_steps=5, save_steps=100, learning_rate=0.0,
                              metric_for_best_model="overall_loss", early_stopping_patience=2)
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    evals = [(r["step"], r["metrics"]["overall_loss"]) for r in history["records"] if r["kind"] == "eval"]
    best = history["best"]
    assert best["greater_is_better"] is False and best["value"] == min(v for _, v in evals)
    assert [s for s, _ in evals] == [5, 10, 15]
    assert best["step"] == 5 and all(v == best["value"] for _, v in evals)
    assert manifest["stopped_early"] is True and manifest["final_step"] == 15


def test_fresh_subsets_draw_the_curve_and_the_paired_rule_compares_on_the_fixed_subset(demo_params):
    params = demo_params
    params["training"].update(max_steps=20, logging_steps=5, eval_steps=5, save_steps=100, learning_rate=5e-3,
                              eval_subset_strategy="fresh", best_model_selection="paired")
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    evals = [r for r in history["records"] if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 15, 20] and all(r["subset"] == "fresh" for r in evals)
    assert evals[0]["reason"] == "first evaluation"
    # Both checkpoints on the same 130 images (the fixed subset: 50 digits + 80 shapes), not on two fresh draws.
    for record in evals[1:]:
        assert record["reason"].startswith("paired: "), record["reason"]
        assert "on the same 130 images" in record["reason"], record["reason"]
    assert manifest["best"]["selection"] == "paired"
    assert manifest["best"]["best_model_reason"] in [r["reason"] for r in evals]


def test_one_process_trains_the_same_under_zero_stage_0_as_under_stage_2(demo_params, tmp_path, caplog):
    # training.single_process_zero_stage: 0 skips ZeRO-2's gradient buckets on one GPU; the update is the same.
    caplog.set_level("INFO", logger="food_multids.training.loop")
    runs, stages = [], []
    for stage in (None, 0):
        caplog.clear()
        params = copy.deepcopy(demo_params)
        params["deepspeed"] = {"zero_optimization": {"stage": 2}}
        params["training"].update(max_steps=6, logging_steps=2, eval_steps=6, save_steps=6, device="cpu",
                                  single_process_zero_stage=stage, output_dir=str(tmp_path / f"stage{stage}"))
        history, _ = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
        runs.append([r["metrics"]["overall_loss"] for r in history["records"]])
        stages.append(re.findall(r"\(1 process\(es\), ZeRO-(\d)", caplog.text))
    assert stages == [["2"], ["0"]]  # the engine ran under the stage asked for
    assert len(runs[0]) == 4  # three training windows and one evaluation
    # Losses after the first window depend on the updates made (learning rate > 0): a stage that skipped or
    # changed them would show here.
    assert demo_params["training"]["learning_rate"] > 0 and runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_unknown_best_metric_is_a_clear_error(demo_params):
    params = demo_params
    params["training"].update(max_steps=2, eval_steps=2, metric_for_best_model="food101_accuracy")
    with pytest.raises(ValueError, match="metric_for_best_model is 'food101_accuracy'.*digits_accuracy"):
        train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))


def test_non_finite_loss_stops_training_with_a_clear_error(demo_params):
    # bf16 runs skip DeepSpeed's per-tensor overflow scan, so the loop itself must not carry on with NaN weights.
    params = demo_params
    params["training"].update(max_steps=8, logging_steps=2, eval_steps=100, save_steps=100, learning_rate=1e30,
                              head_lr=1e30, vision_lr=1e30)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* up to step \d+.*check_grad_overflow"):
        train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))


def run_driver(params, tmp_path, name, wait=True):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(params))
    # Exact equality between two processes is the point of the callers: pin the thread count, since
    # the reduction order of a matmul (and so its last bits) depends on it.
    env = {**os.environ, "FOOD_MULTIDS_PROGRESS": "never", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(spec), str(tmp_path / f"{name}_result.json")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        return json.loads((tmp_path / f"{name}_result.json").read_text())
    return proc


def comparable(records):
    return [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "images_per_second"}} for r in records]


def start_and_signal(params, tmp_path, name, signum):
    """Start a training process, send `signum` once its first checkpoint is complete; return (proc, output)."""
    proc = run_driver(params, tmp_path, name, wait=False)
    out_dir = Path(params["training"]["output_dir"])
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signum)
    output, _ = proc.communicate(timeout=300)
    assert not (out_dir / "FINISHED.json").exists(), "the run finished before the signal arrived"
    return proc, output


@pytest.mark.threads_pinned  # every run is a driver process at one thread
def test_resume_after_sigkill_or_sigterm_ends_with_the_same_metrics(demo_params, tmp_path):
    params = demo_params
    params["data"].update(mix_strategy="weighted")
    params["datasets"]["dataset_configs"]["digits"]["weight"] = 1.0
    params["datasets"]["dataset_configs"]["shapes"]["weight"] = 2.0
    # With a weight average that the evaluations use: its state must come back exactly too (the partial
    # evaluations compared below score the average). Resume without it: the adaptive-mixing test below.
    params["training"].update(num_train_epochs=3, logging_steps=6, eval_steps=12, save_steps=15,
                              output_dir=str(tmp_path / "straight"), ema={"decay": 0.9, "start_step": 4})
    straight = run_driver(params, tmp_path, "straight")
    total = straight["manifest"]["total_steps"]

    # SIGKILL: nothing runs after the signal; the newest complete checkpoint is where it goes on.
    params["training"].update(output_dir=str(tmp_path / "killed"), resume_from_checkpoint="auto")
    start_and_signal(params, tmp_path, "killed", signal.SIGKILL)
    killed_at = complete_checkpoints(tmp_path / "killed")[-1][0]
    assert killed_at < total
    # A newer checkpoint without its COMPLETE marker (a kill mid-write) must be ignored.
    (tmp_path / "killed" / "checkpoints" / "step-00099999").mkdir()
    resumed = run_driver(params, tmp_path, "resumed")
    assert comparable(resumed["history"]["records"]) == comparable(straight["history"]["records"])
    assert resumed["history"]["best"] == straight["history"]["best"]
    assert resumed["manifest"]["final_step"] == straight["manifest"]["final_step"]
    # The re-rank candidates: the same k = 3 steps, and on disk exactly their folders.
    steps = [c["step"] for c in straight["history"]["candidates"]]
    assert len(steps) == 3 and straight["history"]["best"]["step"] in steps
    assert [c["step"] for c in resumed["history"]["candidates"]] == steps
    pointer = json.loads((tmp_path / "killed" / "best.json").read_text())
    assert [c["step"] for c in pointer["candidates"]] == steps
    assert sorted(p.name for p in (tmp_path / "killed" / "best").iterdir()) == [f"step-{s:08d}" for s in steps]

    # SIGTERM (a cluster's pre-emption): stop after the current step with a checkpoint there, exit non-zero.
    params["training"].update(output_dir=str(tmp_path / "termed"))
    proc, output = start_and_signal(params, tmp_path, "termed", signal.SIGTERM)
    assert proc.returncode != 0
    stopped = re.search(r"TrainingInterrupted: training stopped by SIGTERM at step (\d+) of (\d+); resumable "
                        r"checkpoint (\S+); run again with training.resume_from_checkpoint: auto", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert complete_checkpoints(tmp_path / "termed")[-1] == (step, Path(stopped.group(3))) and step < total
    resumed = run_driver(params, tmp_path, "termed_resumed")
    assert comparable(resumed["history"]["records"]) == comparable(straight["history"]["records"])
    assert resumed["history"]["best"] == straight["history"]["best"]


@pytest.mark.threads_pinned  # every run is a driver process at one thread
def test_adaptive_mixing_steers_the_mix_and_a_killed_run_resumes_to_the_same_weights_and_batches(demo_params, tmp_path):
    params = demo_params
    params["data"].update(mix_strategy="adaptive", mix_adaptive={"signal": "train_loss", "step_size": 2.0})
    params["training"].update(num_train_epochs=2, logging_steps=4, eval_steps=20, save_steps=10,
                              output_dir=str(tmp_path / "straight"))
    straight = run_driver(params, tmp_path, "straight")
    mixes = [r for r in straight["history"]["records"] if r["kind"] == "mix"]
    windows = [r for r in straight["history"]["records"] if r["kind"] == "train"]
    assert len(mixes) == len(windows) and mixes[0]["signal"] == "train_loss"
    # shapes (40 classes) has the higher loss: its share grows past the temperature mix's, and the batches
    # after an update follow the new weights.
    target = straight["history"]["target_mix"]["shapes"]
    assert mixes[-1]["metrics"]["shapes"] > target + 0.05
    assert windows[-1]["metrics"]["shapes_share"] > target + 0.05
    for record in mixes:
        assert sum(record["metrics"][n] for n in ("digits", "shapes")) == pytest.approx(1.0)

    params["training"].update(output_dir=str(tmp_path / "killed"), resume_from_checkpoint="auto")
    start_and_signal(params, tmp_path, "killed", signal.SIGKILL)
    resumed = run_driver(params, tmp_path, "resumed")
    assert comparable(resumed["history"]["records"]) == comparable(straight["history"]["records"])


def test_two_processes_share_the_work_and_rank0_logs_once(demo_params, tmp_path):
    params = demo_params
    params["training"].update(num_processes=2, max_steps=10, logging_steps=5, eval_steps=10, save_steps=10,
                              per_device_train_batch_size=4, device="cpu")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert manifest["world_size"] == 2
    samples = metric_history(client, run.info.run_id, "train_overall_samples")
    assert samples == [(5, 2 * 4 * 5.0), (10, 2 * 4 * 5.0)]  # all-reduced over both ranks, logged once per step
    per_ds = metric_history(client, run.info.run_id, "train_digits_samples")[0][1] + \
        metric_history(client, run.info.run_id, "train_shapes_samples")[0][1]
    assert per_ds == 40.0
    assert metric_history(client, run.info.run_id, "eval_overall_samples") == [(10, 130.0)]
    logged = {r["step"]: r["metrics"]["overall_samples"] for r in history["records"] if r["kind"] == "train"}
    assert logged == {5: 40.0, 10: 40.0}
    assert (Path(manifest["best"]["path"]) / "classifier.json").is_file()
