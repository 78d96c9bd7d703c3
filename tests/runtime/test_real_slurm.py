"""The README's sbatch recipe through a real SLURM: Debian's slurmctld + slurmd (+ munge) as a one-node
cluster on this machine, started here for the test. `sbatch` runs the recipe, Kedro in the batch script
starts each step with the real `srun ... torchrun`, `scancel --signal=TERM --batch` delivers the signal
the way `#SBATCH --signal=B:TERM@600` does at the time limit, and resubmitting resumes.

`.ci/run` installs the packages (apt) and sets FOOD_MULTIDS_REQUIRE_SLURM=1, so CI runs this test; a
developer machine without them skips it, saying which packages to install."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import KEDRO, REPO, free_port, kedro_env

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "squeue", "scontrol")
PACKAGES = "slurmctld slurmd slurm-client munge"


def recipe() -> str:
    section = (REPO / "README.md").read_text().split("### Several machines", 1)[1]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]


@pytest.fixture
def slurm_cluster(tmp_path):
    """A one-node SLURM cluster (this host), its SLURM_CONF, torn down after the test."""
    missing = [d for d in DAEMONS if shutil.which(d, path=f"/usr/sbin:/usr/bin:{os.environ['PATH']}") is None]
    if missing:
        if os.environ.get("FOOD_MULTIDS_REQUIRE_SLURM") == "1":
            pytest.fail(f"{', '.join(missing)} not installed: apt-get install -y {PACKAGES} (.ci/run does)")
        pytest.skip(f"no SLURM here ({', '.join(missing)}): apt-get install -y {PACKAGES}")
    folder = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=foodmultids", f"SlurmctldHost={host}", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SlurmUser=root", "SlurmdUser=root", "MpiDefault=none",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"/usr/sbin:/usr/bin:{os.environ['PATH']}"}
    started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munge:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], env=env, check=True, capture_output=True)
    subprocess.run(["slurmctld", "-c"], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd"], env=env, check=True, capture_output=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, (folder / "slurmctld.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for name in ("slurmd", "slurmctld"):
            pid_file = folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)


def job_state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", out)
    return found.group(1) if found else "GONE"


def wait_for_end(env: dict, job: str, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while (state := job_state(env, job)) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.time() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


@pytest.mark.multinode
@pytest.mark.e2e
@pytest.mark.threads_pinned
def test_the_readme_sbatch_recipe_runs_stops_on_the_batch_signal_and_resumes(slurm_cluster, project_copy, tmp_path):
    steps = ("training.max_steps=120,training.logging_steps=4,training.eval_steps=120,training.save_steps=8,"
             "training.device=cpu,training.num_processes=1,training.progress_bar=never")
    script = recipe()
    # This machine's cluster: one node, its cores, no GPUs, the test's project copy and the demo's parameters
    # (the recipe's own `--env gpu` names a GPU model); every other line runs as written.
    script = re.sub(r"#SBATCH --nodes=\d+", "#SBATCH --nodes=1", script)
    script = re.sub(r"#SBATCH --cpus-per-task=\d+", f"#SBATCH --cpus-per-task={os.cpu_count()}", script)
    script = re.sub(r"#SBATCH --gpus-per-node=\d+\n", "", script)
    script = re.sub(r"^cd \S+", f"cd {project_copy}", script, flags=re.M)
    script, n = re.subn(r"exec \.venv/bin/kedro run --env gpu --params (\S+)", rf"exec {KEDRO} run --params \1,{steps}",
                        script)
    assert n == 1 and "#SBATCH --signal=B:TERM@" in script, script
    (tmp_path / "train.sbatch").write_text(script)
    env = {**slurm_cluster, **kedro_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def submit(name: str) -> tuple[str, Path]:
        log = tmp_path / f"{name}.out"
        out = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(tmp_path / "train.sbatch")], env=env,
                             capture_output=True, text=True, check=True).stdout
        return out.strip().split(";")[0], log

    out_dir = project_copy / "data/06_models/train_output"
    job, log = submit("first")
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir):
        assert time.time() < deadline and job_state(env, job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text()[-4000:] if log.exists() else job_state(env, job)
        time.sleep(0.2)
    # What `#SBATCH --signal=B:TERM@600` does at the time limit: SIGTERM to the batch shell only (exec'd Kedro).
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=env, check=True)
    wait_for_end(env, job)
    output = log.read_text()
    assert "Starting a SLURM job step: 1 node(s) x 1 process(es)" in output, output[-4000:]
    stopped = re.search(r"training stopped by SIGTERM at step (\d+) of 120; resumable checkpoint ([^;\s]+)", output)
    assert stopped, output[-4000:]
    step = int(stopped.group(1))
    assert complete_checkpoints(out_dir)[-1] == (step, Path(stopped.group(2))) and 8 <= step < 120

    job, log = submit("resubmitted")  # the same script, as a user resubmits after the time limit
    assert wait_for_end(env, job) == "COMPLETED", log.read_text()[-4000:]
    output = log.read_text()
    assert f"Resumed from {out_dir / 'checkpoints' / f'step-{step:08d}'}" in output, output[-4000:]
    assert (out_dir / "FINISHED.json").exists()
