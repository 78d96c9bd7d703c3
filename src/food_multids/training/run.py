"""Run training in this process (one device) or under a launcher (several processes/hosts).

Kedro stays single-process: for several processes the train node writes its inputs and resolved
parameters to <output_dir>/launch/, starts them (runtime/launch.py: torchrun, a SLURM step, or DeepSpeed's
launcher with a hostfile) on food_multids.training.worker, and reads back rank 0's result. MLFLOW_RUN_ID and
MLFLOW_TRACKING_URI point rank 0 at the Kedro session's MLflow run.
"""

from __future__ import annotations

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.runtime.device import join_process_group
from food_multids.runtime.launch import launch_processes, resolve_world_size, uses_launcher
from food_multids.tracking import active_run_target
from food_multids.training.loop import Trainer, TrainingResult
from food_multids.training.output_dir import OutputDirLock, check_writable


def run_training(cfg: ProjectConfig, params: dict, train: pd.DataFrame, eval_subset: pd.DataFrame,
                 full_eval: pd.DataFrame) -> TrainingResult:
    """Train in this process or under a launcher, owning training.output_dir throughout."""
    output_dir = cfg.training.resolved_output_dir()
    check_writable(output_dir)
    with OutputDirLock(output_dir):
        return _run_training(cfg, params, train, eval_subset, full_eval)


def _run_training(cfg: ProjectConfig, params: dict, train: pd.DataFrame, eval_subset: pd.DataFrame,
                  full_eval: pd.DataFrame) -> TrainingResult:
    world = resolve_world_size(cfg.training)
    run_id, tracking_uri = active_run_target()
    if not uses_launcher(cfg.training, world):
        return Trainer(cfg, join_process_group(cfg), train, eval_subset, full_eval, run_id, tracking_uri).run()

    launch = cfg.training.resolved_output_dir() / "launch"
    result, _ = launch_processes(cfg.training, world, launch, params,
                                 {"train": train, "eval_subset": eval_subset, "full_eval": full_eval},
                                 "food_multids.training.worker", run_id, tracking_uri)
    return TrainingResult(result["history"], result["manifest"])
