"""Several processes under a launcher: the launch folder, the command, the worker's side.

The parent writes the inputs (parquet) and the resolved parameters to a launch folder, starts
`torchrun --standalone --nproc-per-node N -m <worker>` (with a hostfile: `deepspeed --num_gpus N --hostfile F
--module <worker>`), and reads back rank 0's result file.
Training (training/run.py), the full evaluation (pipelines/full_eval) and predict all launch this
way. With `training.nodes.launch: slurm` each launch is a job step (`srun ... torchrun`); with `torchrun` the
parent is node 0 of several and starts `torchrun --node-rank 0` (runtime/cluster.py, node_zero.py). One
machine runs on torchrun too; only the hostfile/ssh mode keeps DeepSpeed's launcher (it reaches the other
machines by ssh/pdsh).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from food_multids.config import ProjectConfig, TrainConfig
from food_multids.config.paths import find_project_root, resolve_path, use_project_root
from food_multids.helpers.interrupts import RunInterrupted, TrainingInterrupted
from food_multids.runtime.cluster import (
    STOP_GRACE_S,
    SUPERVISOR_ENV,
    die_with_parent,
    stop_gracefully,
)
from food_multids.runtime.commands import deepspeed_launcher, torchrun_launcher
from food_multids.runtime.files import write_json_atomic

logger = logging.getLogger(__name__)
RESULT_FILE = "result.json"


@dataclass
class WorkerContext:
    """What a process started by a launcher needs: its rank, the parameter sections its node took, the
    launch folder."""

    rank: int
    params: dict
    spec: dict
    launch: Path

    @property
    def cfg(self) -> ProjectConfig:
        """The sections as one config (training and evaluation workers: their nodes take model, data, ...)."""
        return ProjectConfig.from_params(self.params, check_files=False)

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
    root = spec.get("project_root")
    if root and os.path.isdir(root):  # else (another machine, another path) the search from the current directory
        use_project_root(root)
    return WorkerContext(rank, spec["parameters"], spec, Path(spec["launch_dir"]))


def resolve_world_size(training: TrainConfig) -> int:
    return world_size_for(training.num_processes, training.device)


def world_size_for(num_processes: int | None, device: str) -> int:
    """The processes asked for, else one per visible GPU (1 on CPU or with device: cpu)."""
    if num_processes is not None:
        return num_processes
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def uses_launcher(training: TrainConfig, world: int) -> bool:
    """Several processes, or other machines: a launcher starts them (else this process works)."""
    return world > 1 or training.launch_mode() != "single"


def launcher_command(training: TrainConfig, world: int, spec: Path,
                     module: str = "food_multids.training.worker") -> list[str]:
    """This machine's processes: `torchrun --standalone` (it passes SIGTERM/SIGINT once to each rank and waits
    for them); with a hostfile (launch: ssh) DeepSpeed's launcher, which reaches the other machines by ssh."""
    if training.launch_mode() == "ssh":
        cmd = [deepspeed_launcher(), "--num_gpus", str(world), "--hostfile", str(resolve_path(training.hostfile))]
        if training.master_port:
            cmd += ["--master_port", str(training.master_port)]
        return cmd + ["--module", module, "--spec", str(spec)]
    cmd = [torchrun_launcher(), f"--nproc-per-node={world}", "--max-restarts=0", f"--shutdown-timeout={STOP_GRACE_S}"]
    if training.master_port:
        cmd += ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={training.master_port}"]
    else:
        cmd += ["--standalone"]  # a free port of its own: two runs on one machine do not collide
    return cmd + ["-m", module, "--spec", str(spec)]


def slurm_step_command(plan, spec: Path, module: str, step: str) -> list[str]:
    """One job step of the allocation Kedro runs in: srun starts one task per node (--kill-on-bad-exit: a
    failed node ends the step on every node), each task a torchrun agent for its node's processes, its
    node rank from SLURM_NODEID (torchrun reads PET_NODE_RANK as --node-rank), the master on the first node.
    A signal reaches the tasks through scancel (stop_slurm_step), torchrun passes it to the ranks, which stop
    at an agreed step with a checkpoint; torchrun kills them after STOP_GRACE_S."""
    srun = shutil.which("srun")
    if srun is None:
        raise FileNotFoundError("training.nodes.launch is slurm but `srun` is not on PATH: run Kedro inside the "
                                "allocation (in the sbatch script), see README 'Several machines'")
    torchrun = torchrun_launcher()
    return [srun, f"--nodes={plan.num_nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--job-name=food_multids-{step}",
            "bash", "-c", 'export PET_NODE_RANK="$SLURM_NODEID"; exec "$@"', "food_multids-step",
            torchrun, f"--nnodes={plan.num_nodes}", f"--nproc-per-node={plan.procs_per_node}",
            f"--master-addr={plan.master_addr}", f"--master-port={plan.master_port}", "--max-restarts=0",
            f"--shutdown-timeout={STOP_GRACE_S}", "-m", module, "--spec", str(spec)]


def write_result(launch: Path, values: dict, frames: dict[str, pd.DataFrame] | None = None) -> None:
    """Rank 0's answer to the parent, the one convention of every worker (training, evaluation, predict): its
    tables as result_<name>.parquet, then result.json, written last and atomically (there means complete)."""
    for name, frame in (frames or {}).items():
        frame.to_parquet(launch / f"result_{name}.parquet")
    write_json_atomic(launch / RESULT_FILE, {**values, "frames": sorted(frames or {})})


def read_result(launch: Path) -> tuple[dict, dict[str, pd.DataFrame]]:
    """What write_result wrote: the values and the tables by name."""
    values = json.loads((launch / RESULT_FILE).read_text())
    return values, {name: pd.read_parquet(launch / f"result_{name}.parquet") for name in values.pop("frames", [])}


def raise_if_interrupted(launch: Path) -> None:
    """Rank 0's result says the ranks stopped at an agreed step on a signal: raise that here, with its
    message (the step and the checkpoint to resume from)."""
    try:
        result = json.loads((launch / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(result, dict) and "interrupted" in result:
        raise TrainingInterrupted(result.get("signum", signal.SIGTERM), result["interrupted"])


def stop_slurm_step(proc: subprocess.Popen, job_name: str, signum: int) -> None:
    """Pass a signal to every task of the running job step, on every node: `scancel --signal=TERM <job>.<step>`
    (slurmstepd delivers it; torchrun passes it once to each rank, which agree on a step, save and stop).
    Not to srun itself: srun answers SIGTERM with "forcing job termination" and SIGKILLs the tasks, which
    would lose everything since the last checkpoint. Without squeue/scancel (or the step not registered
    yet), srun gets the signal after all."""
    name = signal.Signals(signum).name.removeprefix("SIG")
    job = os.environ.get("SLURM_JOB_ID")
    squeue, scancel = shutil.which("squeue"), shutil.which("scancel")
    steps: list[str] = []
    try:
        if job and squeue and scancel:
            listed = subprocess.run([squeue, "--steps", f"--jobs={job}", "--noheader", "--format=%i %j"],
                                    capture_output=True, text=True, check=False, timeout=30)
            steps = [line.split()[0] for line in listed.stdout.splitlines() if line.split()[1:] == [job_name]]
        steps = [step_id for step_id in steps if subprocess.run(
            [scancel, f"--signal={name}", step_id], capture_output=True, check=False, timeout=30).returncode == 0]
    except subprocess.TimeoutExpired:  # slurmctld does not answer: srun, at least, ends the step
        steps = []
    if steps:
        logger.warning("Passed SIG%s to SLURM job step %s: its ranks stop at the next agreed step with a checkpoint",
                       name, ", ".join(steps))
    else:
        logger.warning("Could not find the SLURM job step %s of job %s (squeue/scancel): SIG%s to srun, which ends "
                       "the step without a checkpoint", job_name, job, name)
        proc.send_signal(signum)


def launcher_env(procs: int = 1) -> dict:
    """This process's environment for a launcher: without the rank variables a scheduler (or an outer
    launcher) may have set, which the launcher sets for each rank itself. Without OMP_NUM_THREADS, each of
    `procs` ranks gets its share of this machine's cores (torchrun would give each one thread)."""
    # PET_* too: torchrun takes any flag it is not given from them (PET_RDZV_ENDPOINT would move the
    # rendezvous onto node 0's store port); each command here gives torchrun what it needs.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT") and not k.startswith("PET_")}
    env["PYTHONUNBUFFERED"] = "1"
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, procs)))
    return env


def launch_processes(training: TrainConfig, world: int, launch: Path, params: dict, frames: dict[str, pd.DataFrame],
                     module: str, run_id: str | None = None, tracking_uri: str | None = None,
                     extra: dict | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Write the inputs to `launch`, run `module` under a launcher, fail loudly if any rank fails, return rank
    0's result (read_result). `training` holds the launch settings; `params` (the node's parameter sections)
    goes to the workers as it is."""
    launch.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(launch / f"{name}.parquet")
    (launch / RESULT_FILE).unlink(missing_ok=True)
    spec = launch / "spec.json"
    spec.write_text(json.dumps({"parameters": params, "launch_dir": str(launch),
                                "project_root": str(find_project_root()),
                                **(extra or {})}, default=str))
    env = launcher_env(world)
    if run_id:
        env.update(MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=tracking_uri or "")
    if training.launch_mode() == "torchrun":
        from food_multids.runtime import cluster, node_zero

        try:
            node_zero.run_node_zero(training, cluster.resolve_plan(training, world), module, str(spec), env)
        except cluster.NodeFailure as exc:
            raise RuntimeError(f"multi-node launch failed: {exc}") from None
        except RunInterrupted:
            raise_if_interrupted(launch)
            raise
        raise_if_interrupted(launch)
        return read_result(launch)
    if training.launch_mode() == "slurm":
        from food_multids.runtime import cluster

        try:
            plan = cluster.resolve_plan(training, world)
        except cluster.NodeFailure as exc:
            raise RuntimeError(f"SLURM launch: {exc}") from None
        step = "train" if launch.name == "launch" else launch.name.removeprefix("launch_")  # eval, rerank, predict
        cmd = slurm_step_command(plan, spec, module, step)
        logger.info("Starting a SLURM job step: %d node(s) x %d process(es): %s", plan.num_nodes, world, " ".join(cmd))
    else:
        cmd = launcher_command(training, world, spec, module)
        logger.info("Starting %d processes: %s", world, " ".join(cmd))
    # A session of its own: Ctrl-C in the terminal reaches Kedro alone, which passes it on once (a rank that
    # got it twice, from the terminal and its launcher, would stop at once, without its checkpoint). The
    # launcher dies with Kedro, and on this machine the ranks watch Kedro too: none trains on unwatched.
    # (Not through srun or ssh: Kedro's process id means nothing on the other machines.)
    if training.launch_mode() == "single":
        env = {**env, SUPERVISOR_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - see die_with_parent
    try:
        proc.wait()
    except (RunInterrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if training.launch_mode() == "slurm":
            stop_gracefully(proc, signum, lambda p, s: stop_slurm_step(p, f"food_multids-{step}", s))
        elif training.launch_mode() == "ssh":  # DeepSpeed's runner signals pdsh and runs its kill command
            stop_gracefully(proc, signum, lambda p, s: p.send_signal(s))
        else:
            stop_gracefully(proc, signum)  # the ranks stop at their next agreed step with a checkpoint
        raise_if_interrupted(launch)
        raise
    raise_if_interrupted(launch)  # a signal reached only the ranks (a scheduler's, or on another node)
    if proc.returncode != 0:
        what = {"slurm": "the SLURM job step", "ssh": "the DeepSpeed launcher"}.get(training.launch_mode(), "torchrun")
        raise RuntimeError(f"{what} exited with code {proc.returncode} (command: {' '.join(cmd)}); "
                           "see the rank logs above")
    return read_result(launch)
