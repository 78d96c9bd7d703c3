"""Several processes under the DeepSpeed launcher: the launch folder, the command, the worker's side.

The parent writes the inputs (parquet) and the resolved parameters to a launch folder, starts
`deepspeed --num_gpus N [--hostfile F] --module <worker>`, and reads back rank 0's result file.
Training (training/launcher.py), the full evaluation (pipelines/full_eval) and predict all launch this
way. With `training.nodes.launch: per_node` the parent is node 0 of several (runtime/nodes.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from food_multids.config import ProjectConfig
from food_multids.config.paths import find_project_root, resolve_path
from food_multids.helpers.interrupts import RunInterrupted
from food_multids.runtime.commands import deepspeed_launcher  # noqa: F401 - the launch's public name too

logger = logging.getLogger(__name__)
RESULT_FILE = "result.json"


@dataclass
class WorkerContext:
    """What a process started by the DeepSpeed launcher needs: its rank, the config and the launch folder."""

    rank: int
    cfg: ProjectConfig
    spec: dict
    launch: Path

    def frame(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.launch / f"{name}.parquet")


def worker_context(argv: list[str] | None = None) -> WorkerContext:
    """Parse `--spec` (and the launcher's `--local_rank`), set up per-rank logging, load the config."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] rank{rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(args.spec.read_text())
    cfg = ProjectConfig.from_params(spec["parameters"], check_files=False)
    return WorkerContext(rank, cfg, spec, Path(spec["launch_dir"]))


def resolve_world_size(cfg: ProjectConfig) -> int:
    return world_size_for(cfg.training.num_processes, cfg.training.device)


def world_size_for(num_processes: int | None, device: str) -> int:
    """The processes asked for, else one per visible GPU (1 on CPU or with device: cpu)."""
    if num_processes is not None:
        return num_processes
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def uses_launcher(cfg: ProjectConfig, world: int) -> bool:
    """Several processes, or other machines: the DeepSpeed launcher starts them (else this process works)."""
    return world > 1 or cfg.training.launch_mode() != "single"


def launcher_command(cfg: ProjectConfig, world: int, spec: Path, module: str = "food_multids.training.worker") -> list[str]:
    cmd = [deepspeed_launcher(), "--num_gpus", str(world)]
    if cfg.training.hostfile:
        cmd += ["--hostfile", str(resolve_path(cfg.training.hostfile))]
    if cfg.training.master_port:
        cmd += ["--master_port", str(cfg.training.master_port)]
    return cmd + ["--module", module, "--spec", str(spec)]


def launcher_env(project_root: str) -> dict:
    """This process's environment for the DeepSpeed launcher: without the rank variables a scheduler (or an
    outer launcher) may have set, which the launcher sets for each rank itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(FOOD_MULTIDS_PROJECT_ROOT=project_root, PYTHONUNBUFFERED="1")
    return env


def launch_processes(cfg: ProjectConfig, world: int, launch: Path, params: dict, frames: dict[str, pd.DataFrame],
                     module: str, run_id: str | None = None, tracking_uri: str | None = None,
                     extra: dict | None = None) -> None:
    """Write the inputs to `launch`, run `module` under the DeepSpeed launcher, fail loudly if any rank fails."""
    launch.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(launch / f"{name}.parquet")
    (launch / RESULT_FILE).unlink(missing_ok=True)
    spec = launch / "spec.json"
    spec.write_text(json.dumps({"parameters": params, "launch_dir": str(launch), **(extra or {})}, default=str))
    env = launcher_env(str(find_project_root()))
    if run_id:
        env.update(MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=tracking_uri or "")
    if cfg.training.launch_mode() == "per_node":
        from food_multids.runtime import node_supervisor, nodes

        try:
            node_supervisor.run_node_zero(cfg, nodes.resolve_plan(cfg, world), ["--module", module, "--spec", str(spec)],
                                          env)
        except nodes.NodeFailure as exc:
            raise RuntimeError(f"multi-node launch failed: {exc}") from None
        return
    cmd = launcher_command(cfg, world, spec, module)
    logger.info("Starting %d processes: %s", world, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    try:
        proc.wait()
    except (RunInterrupted, KeyboardInterrupt):
        # The launcher passes SIGTERM to every rank, which stop at their next agreed step with a
        # checkpoint (it kills ranks that take longer than 30 s).
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"the DeepSpeed launcher exited with code {proc.returncode} (command: {' '.join(cmd)}); "
                           "see the rank logs above")
