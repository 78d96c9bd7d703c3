"""MLflow runs that read well: named for what they are, and evaluations linked to their training run.

A run is named `<pipelines> · <env> · <model folder> · <start time>` (kedro-mlflow would call it
`__default__`). A `full_eval` or `report` run on its own evaluates a model trained in another run: it
becomes a child of that training run (tag `mlflow.parentRunId`, so the UI nests it under it), records
`food_multids.training_run_id`, and the training run records `food_multids.eval_run_id`, the newest
evaluation of its model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PIPELINE_LABELS = {"__default__": "train+full_eval"}


def run_name(pipeline_names: list[str] | None, env: str, name_or_path: str, started: float,
             details: list[str] | None = None) -> str:
    """`<pipelines> · <env> · <model folder> [· <what differs>] · <start time>`."""
    pipelines = "+".join(PIPELINE_LABELS.get(n, n) for n in (pipeline_names or ["__default__"]))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
    extra = f" · {', '.join(details)}" if details else ""
    return f"{pipelines} · {env} · {Path(name_or_path).name or name_or_path}{extra} · {stamp}"


def run_details(parameters: dict, runtime_params: dict | None, limit: int = 80) -> list[str]:
    """What tells two runs of one env apart: LoRA fine-tuning, and each `--params` override as
    `key=value` (the last part of its path), cut to `limit` characters in all."""
    details = ["lora"] if ((parameters or {}).get("model") or {}).get("finetuning") == "lora" else []

    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(inner, f"{prefix}.{key}" if prefix else str(key))
        else:
            yield prefix, value

    for key, value in flat(runtime_params or {}):
        short = key.rsplit(".", 1)[-1]
        if short == "finetuning":
            continue  # said above
        details.append(f"{short}={value}")
    text, kept = 0, []
    for item in details:
        if text + len(item) > limit:
            kept.append("...")
            break
        kept.append(item)
        text += len(item) + 2
    return kept


def recorded_training_info(catalog, node_names: set[str]) -> dict:
    """What the model this run evaluates records about its training (its run, backbone, settings);
    empty when this run trains it, or when nothing is recorded."""
    from food_multids.evaluation.full import read_model_info

    if "train_deepspeed" in node_names:
        return {}
    try:
        if "full_evaluate" in node_names:
            return read_model_info(Path(str(catalog.load("best_model"))))
        if "report" in node_names:
            return catalog.load("eval_metrics").get("model_info") or {}
    except Exception as exc:  # a missing or unreadable input: the node reports it properly
        logger.debug("no training info to link: %s", exc)
    return {}


def describe_run(run_id: str, run_params: dict, node_names: set[str], catalog) -> None:
    """Name and tag the active run; link an evaluation run with the training run of its model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from food_multids.config.paths import resolve_path

    client = MlflowClient()
    info = recorded_training_info(catalog, node_names)
    # An evaluation is named after the backbone its model was trained from, not model.name_or_path
    # (which only training reads).
    name_or_path = info.get("backbone") or str((catalog.load("parameters").get("model") or {}).get("name_or_path", ""))
    env = run_params.get("env") or "local"
    run = client.get_run(run_id)
    details = [] if info else run_details(catalog.load("parameters"), run_params.get("runtime_params"))
    name = run_name(run_params.get("pipeline_names"), env, name_or_path, run.info.start_time / 1000, details)
    client.update_run(run_id, name=name)
    client.set_tag(run_id, "food_multids.env", env)
    client.set_tag(run_id, "food_multids.model", str(resolve_path(name_or_path)) if name_or_path else "")
    logger.info("MLflow run %s is named '%s'", run_id, name)
    training_run = info.get("mlflow_run_id")
    if not training_run or training_run == run_id:
        return
    try:
        client.get_run(training_run)
    except MlflowException:
        logger.warning("The evaluated model was trained in MLflow run %s, which is not in this store: not linked",
                       training_run)
        return
    client.set_tag(run_id, "mlflow.parentRunId", training_run)
    client.set_tag(run_id, "food_multids.training_run_id", training_run)
    client.set_tag(training_run, "food_multids.eval_run_id", run_id)
    logger.info("MLflow run '%s' evaluates the model of training run %s (linked both ways)", name, training_run)
