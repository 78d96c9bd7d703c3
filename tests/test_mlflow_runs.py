"""MLflow run names say what a run is, and what sets it apart from the env's other runs."""

from __future__ import annotations

import time

from food_multids.framework.mlflow_runs import run_details, run_name


def test_runs_that_differ_only_by_params_get_different_names():
    started = time.mktime((2026, 12, 6, 9, 12, 0, 0, 0, -1))
    lora = run_details({"model": {"finetuning": "lora"}},
                       {"model": {"finetuning": "lora"}, "training": {"learning_rate": 0.01}})
    full = run_details({"model": {"finetuning": "full"}}, {"training.learning_rate": 0.002})
    assert lora == ["lora", "learning_rate=0.01"] and full == ["learning_rate=0.002"]
    assert run_name(["train"], "local", "/m/Qwen2.5-VL-3B", started, lora) == \
        "train · local · Qwen2.5-VL-3B · lora, learning_rate=0.01 · 2026-12-06 09:12"
    assert run_name(None, "gpu", "/m/Qwen2.5-VL-3B", started,
                    []) == "train+full_eval · gpu · Qwen2.5-VL-3B · 2026-12-06 09:12"
    many = run_details({}, {f"key_number_{i}": "value" for i in range(20)})
    assert many[-1] == "..." and sum(len(d) + 2 for d in many) < 100
