"""The demo's `kedro run` with a tiny model of each other backbone family, built by the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KEDRO, kedro_env

FOOD_MULTIDS = str(Path(KEDRO).with_name("food-multids"))


@pytest.mark.e2e
@pytest.mark.parametrize(("model_type", "pixels"), [("qwen2_vl", 3136), ("qwen3_vl", 4096), ("qwen3_5", 4096)])
def test_kedro_run_trains_and_evaluates_with_another_family(project_copy, model_type, pixels):
    folder = f"data/06_models/tiny_{model_type}"
    build = subprocess.run([FOOD_MULTIDS, "build-tiny-model", folder, "--family", model_type], cwd=project_copy,
                           env=kedro_env(), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert json.loads((project_copy / folder / "config.json").read_text())["model_type"] == model_type
    overrides = (f"model.name_or_path={folder},model.min_pixels={pixels},model.max_pixels={pixels},"
                 "training.max_steps=6,training.eval_steps=3,training.save_steps=3")
    proc = subprocess.run([KEDRO, "run", "--params", overrides], cwd=project_copy, env=kedro_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    best = sorted((project_copy / "data/06_models/best_model").iterdir())[-1] / "best_model"
    assert json.loads((best / "classifier.json").read_text())["family"] == model_type
    assert json.loads((best / "config.json").read_text())["model_type"] == model_type
    metrics = json.loads((sorted((project_copy / "data/07_model_output/eval_metrics.json").iterdir())[-1]
                          / "eval_metrics.json").read_text())
    assert metrics["overall_samples"] == 260 and 0 <= metrics["overall_accuracy"] <= 1


@pytest.mark.e2e
def test_min_pixels_below_one_patch_group_of_the_family_is_refused_before_the_run(project_copy):
    folder = "data/06_models/tiny_qwen3_vl"
    subprocess.run([FOOD_MULTIDS, "build-tiny-model", folder, "--family", "qwen3_vl"], cwd=project_copy,
                   env=kedro_env(), capture_output=True, text=True, timeout=300, check=True)
    proc = subprocess.run([KEDRO, "run", "--params", f"model.name_or_path={folder},model.min_pixels=784"],
                          cwd=project_copy, env=kedro_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert ("params:model.min_pixels must be >= 1024 for Qwen3-VL (one 32x32 group of merged 16-px patches), "
            "got 784") in out
