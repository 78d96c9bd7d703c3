"""training.nodes.launch: slurm, each multi-process step a job step (`srun ... torchrun`) of the allocation
Kedro runs in. Two nodes need a cluster: tests/runtime/fake_slurm/ stands in for srun (N copies of the task
here with SLURM_NODEID set, -K semantics, SIGTERM to srun SIGKILLs the tasks as real srun does), squeue
and scancel (a signal to a step's tasks); torchrun is real. test_real_slurm.py runs one node through a
real slurmctld/slurmd."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from food_multids.config import ProjectConfig
from food_multids.framework.preflight import RunPlan, check_run
from food_multids.runtime.cluster import NodePlan
from food_multids.runtime.launch import slurm_step_command
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import free_port, kedro, kedro_env
from tests.runtime.test_nodes import SHORT, comparable, versions

FAKE_SLURM = Path(__file__).with_name("fake_slurm")


def with_fake_srun(env: dict) -> dict:
    return {**env, "PATH": f"{FAKE_SLURM}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def slurm_env(log: Path) -> dict:
    # Compared bit for bit with a one-machine run: one thread per process (reduction order).
    return with_fake_srun({**kedro_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FAKE_SRUN_LOG": str(log),
                           "FAKE_SLURM_STATE": str(log.with_name("fake_slurm_state")),
                           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "0"})


def slurm(port: int) -> str:
    return ("training.nodes.launch=slurm,training.nodes.master_addr=127.0.0.1,"
            f"training.master_port={port},training.num_processes=1")


def test_the_job_step_command_from_the_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", with_fake_srun(dict(os.environ))["PATH"])
    cmd = slurm_step_command(NodePlan(4, 8, "gpu-node-01", 29511), tmp_path / "spec.json",
                             "food_multids.training.worker", "train")
    assert cmd[0] == str(FAKE_SLURM / "srun")
    assert cmd[1:5] == ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--job-name=food_multids-train"]
    torchrun = cmd.index(next(c for c in cmd if c.endswith("torchrun")))
    # Each task takes its node rank from SLURM_NODEID (torchrun reads PET_NODE_RANK as --node-rank).
    assert cmd[5:torchrun] == ["bash", "-c", 'export PET_NODE_RANK="$SLURM_NODEID"; exec "$@"', "food_multids-step"]
    assert cmd[torchrun + 1:] == ["--nnodes=4", "--nproc-per-node=8", "--master-addr=gpu-node-01",
                                  "--master-port=29511",
                                  "--max-restarts=0", "--shutdown-timeout=300", "-m", "food_multids.training.worker",
                                  "--spec",
                                  str(tmp_path / "spec.json")]


def test_preflight_says_when_srun_or_the_node_count_is_missing(base_params, demo_params, monkeypatch):
    params = copy.deepcopy(demo_params)
    params["training"]["nodes"] = {"launch": "slurm", "master_addr": "127.0.0.1"}
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    monkeypatch.delenv("NNODES", raising=False)
    monkeypatch.delenv("PET_NNODES", raising=False)
    plan = RunPlan(env="local", node_names={"train_deepspeed"}, free_inputs=[])
    found = check_run(plan, params, lambda name: True, {}, lambda name: None)
    missing = "training.nodes.num_nodes is not set and none of PET_NNODES, NNODES, SLURM_NNODES"
    assert any(missing in p for p in found.problems)
    monkeypatch.setenv("SLURM_NNODES", "2")
    found = check_run(plan, params, lambda name: True, {}, lambda name: None)
    assert any("launch is slurm but `srun` is not on PATH" in p for p in found.problems), found.problems
    assert ProjectConfig.from_params(params, check_files=False).training.launch_mode() == "slurm"


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_two_slurm_nodes_train_like_one_machine_with_two_processes_with_no_coordination_files(project_copy, tmp_path):
    log = tmp_path / "srun.log"
    two = kedro(project_copy, "--pipelines", "train", "--params", f"{SHORT},{slurm(free_port())}", env=slurm_env(log))
    assert two.returncode == 0, (two.stdout + two.stderr)[-5000:]
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    # Training, then the re-rank's full evaluation of each of its two candidates: three job steps.
    assert [s[3] for s in steps] == ["--job-name=food_multids-train", "--job-name=food_multids-rerank",
                                     "--job-name=food_multids-rerank"], steps
    assert not (project_copy / "data/06_models/train_output/nodes").exists()  # no board, heartbeat or join files
    one = kedro(project_copy, "--pipelines", "train", "--params",
                f"{SHORT},training.num_processes=2,training.output_dir=data/06_models/one_machine",
                env={**kedro_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert one.returncode == 0, (one.stdout + one.stderr)[-5000:]
    first, second = versions(project_copy / "data/06_models/training_history.json", "training_history.json")
    assert comparable(first["records"]) == comparable(second["records"])
    assert first["best"]["step"] == second["best"]["step"]
    manifests = versions(project_copy / "data/06_models/checkpoint_manifest.json", "checkpoint_manifest.json")
    assert [m["world_size"] for m in manifests] == [2, 2]


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_the_time_limit_signal_stops_every_node_with_a_checkpoint_and_auto_resume_finishes(project_copy, tmp_path):
    # `#SBATCH --signal=B:TERM@120` signals the batch shell, which `exec`s kedro: SIGTERM reaches Kedro, which
    # passes it to the job step's tasks on both nodes (scancel --signal=TERM <job>.<step>; SIGTERM to srun would
    # SIGKILL them), torchrun to the ranks; the ranks agree on a step and save.
    log = tmp_path / "srun.log"
    params = (f"training.max_steps=120,training.logging_steps=4,training.eval_steps=120,training.save_steps=8,"
              f"training.device=cpu,training.resume_from_checkpoint=auto,{slurm(free_port())}")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kedro")), "run", "--pipelines", "train", "--params",
                             params], cwd=project_copy, env=slurm_env(log), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out_dir = project_copy / "data/06_models/train_output"
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-4000:]
    stopped = re.search(r"training stopped by SIGTERM at step (\d+) of 120; resumable checkpoint ([^;\s]+)", output)
    assert stopped, output[-4000:]
    stopped_at = int(stopped.group(1))
    assert complete_checkpoints(out_dir)[-1] == (stopped_at, Path(stopped.group(2))) and 8 <= stopped_at < 120
    assert "Passed SIGTERM to SLURM job step 4242.0: its ranks stop" in output, output[-4000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out_dir) in " ".join(p.info["cmdline"] or [])]
    resumed = kedro(project_copy, "--pipelines", "train", "--params", params, env=slurm_env(log))
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-5000:]
    assert f"Resumed from {out_dir / 'checkpoints' / f'step-{stopped_at:08d}'}" in out, out[-3000:]
    assert json.loads((out_dir / "FINISHED.json").read_text())["final_step"] == 120
