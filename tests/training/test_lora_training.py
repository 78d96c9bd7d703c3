"""Real DeepSpeed training with LoRA on CPU: it learns, saves small best models, resumes exactly after
SIGKILL from checkpoints that hold only what trains, and runs as two gloo processes."""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from food_multids.model.classifier import MultiDatasetClassifier
from food_multids.pipelines import node_sections
from food_multids.pipelines.train.nodes import train_deepspeed
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import make_separable_dataset
from tests.training.test_training import comparable, data_nodes, run_driver, start_and_signal

pytestmark = pytest.mark.slow
LORA = {"finetuning": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "parts": ["language", "vision"],
                                       "target_modules": None}}


def test_lora_learns_a_separable_set_and_saves_a_small_best_model(base_params, tiny_model_dir, tmp_path):
    for name, n in (("alpha", 3), ("beta", 6)):
        for split in ("train", "val"):
            make_separable_dataset(tmp_path / "data", name, n, per_class=6, split=split)
    params = copy.deepcopy(base_params)
    params["model"].update(name_or_path=str(tiny_model_dir), num_labels=6, **copy.deepcopy(LORA))
    params["data"]["train_jsonl_list"] = [str(tmp_path / f"data/{d}/train.jsonl") for d in ("alpha", "beta")]
    params["data"]["val_jsonl_list"] = [str(tmp_path / f"data/{d}/val.jsonl") for d in ("alpha", "beta")]
    params["datasets"]["dataset_configs"] = {"alpha": {"num_classes": 3, "eval_ratio": 1.0},
                                             "beta": {"num_classes": 6, "eval_ratio": 1.0}}
    params["training"].update(output_dir=str(tmp_path / "out"), progress_bar="never", per_device_train_batch_size=9,
                              max_steps=60, logging_steps=20, eval_steps=30, save_steps=60, learning_rate=5e-3)
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    evals = [r["metrics"] for r in history["records"] if r["kind"] == "eval"]
    assert evals[-1]["alpha_accuracy"] >= 0.9 and evals[-1]["beta_accuracy"] >= 0.9, evals[-1]  # chance 1/3, 1/6
    assert evals[-1]["overall_loss"] < 0.5 * math.log(6), evals[-1]
    best = Path(manifest["best"]["path"])
    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in best.iterdir()) < sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    info = json.loads((best / "training_info.json").read_text())
    assert info["finetuning"] == "lora" and 0 < info["trainable_parameters"] < info["total_parameters"]
    assert info["parameters"]["model"]["finetuning"] == "lora"  # the recorded settings are intact
    model = MultiDatasetClassifier.from_pretrained(best)
    assert model.meta.finetuning == "lora" and any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.threads_pinned  # every run is a driver process at one thread
def test_lora_resumes_exactly_after_sigkill_from_checkpoints_of_the_trained_part_only(demo_params, tmp_path):
    params = demo_params
    params["model"].update(copy.deepcopy(LORA))
    params["training"].update(max_steps=36, logging_steps=6, eval_steps=12, save_steps=12, learning_rate=5e-3,
                              output_dir=str(tmp_path / "straight"))
    straight = run_driver(params, tmp_path, "straight")
    params["training"].update(output_dir=str(tmp_path / "killed"), resume_from_checkpoint="auto")
    start_and_signal(params, tmp_path, "killed", signal.SIGKILL)
    step, path = complete_checkpoints(tmp_path / "killed")[-1]
    assert step < 36
    states = torch.load(next(path.glob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    saved = set(states["module"])
    assert saved and all("lora_" in k or k.startswith("head.") or ".merger." in k for k in saved)
    resumed = run_driver(params, tmp_path, "resumed")
    assert comparable(resumed["history"]["records"]) == comparable(straight["history"]["records"])
    assert resumed["history"]["best"] == straight["history"]["best"]


def test_lora_trains_in_two_gloo_processes(demo_params, tmp_path):
    params = demo_params
    params["model"].update(copy.deepcopy(LORA))
    params["training"].update(num_processes=2, max_steps=6, logging_steps=3, eval_steps=6, save_steps=6,
                              per_device_train_batch_size=4, device="cpu")
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    assert manifest["world_size"] == 2
    evals = [r for r in history["records"] if r["kind"] == "eval"]
    assert evals and evals[-1]["metrics"]["overall_samples"] == 130.0
    best = Path(manifest["best"]["path"])
    assert (best / "adapter_model.safetensors").is_file()
    assert MultiDatasetClassifier.from_pretrained(best).meta.lora["targets"]


def test_lora_trains_under_zero3_with_gradient_checkpointing_and_batched_windows(demo_params, tmp_path):
    params = demo_params
    params["model"].update(copy.deepcopy(LORA), gradient_checkpointing=True, batched_vision_windows=True)
    params["deepspeed"] = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    params["training"].update(max_steps=6, logging_steps=3, eval_steps=6, save_steps=6, learning_rate=5e-3,
                              resume_from_checkpoint="auto")
    history, manifest = train_deepspeed(*data_nodes(params), **node_sections(train_deepspeed, params))
    losses = [r["metrics"]["overall_loss"] for r in history["records"] if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    best = Path(manifest["best"]["path"])
    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()
    model = MultiDatasetClassifier.from_pretrained(best)
    trained_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert trained_b and all(v.abs().sum() > 0 for v in trained_b)  # gathered after training (B starts at zero)


@pytest.mark.e2e
def test_kedro_run_with_lora_runs_the_whole_default_pipeline_on_the_demo(project_copy):
    import subprocess

    from tests.conftest import KEDRO, kedro_env

    proc = subprocess.run([KEDRO, "run", "--params", "model.finetuning=lora,training.num_train_epochs=1"],
                          cwd=project_copy, env=kedro_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    versions = sorted((project_copy / "data/06_models/best_model").iterdir())
    assert (versions[-1] / "best_model/adapter_model.safetensors").is_file()
    report = sorted((project_copy / "data/08_reporting/report.html").iterdir())[-1] / "report.html"
    assert "LoRA r=16, alpha=32 on language layers;" in report.read_text()
    registered = sorted((project_copy / "data/06_models/registered_model.json").iterdir())[-1]
    assert json.loads((registered / "registered_model.json").read_text())["registry_uri"] == "models:/food_multids/1"
