"""Several machines, as two nodes on this one: `kedro run` as node 0 and `food-multids node-worker` as node 1,
meeting in the store node 0's Kedro holds; each node runs every step as its own `torchrun --node-rank K`
(gloo on 127.0.0.1, one CPU process per node)."""

from __future__ import annotations

import copy
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from food_multids.config import ConfigError, ProjectConfig, TrainConfig
from food_multids.runtime.cluster import NodeFailure, NodePlan, resolve_plan
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import free_port, kedro, kedro_env

REPO = Path(__file__).resolve().parents[2]
FOOD_MULTIDS = str(Path(sys.executable).with_name("food-multids"))
logger = logging.getLogger(__name__)
SHORT = ("training.max_steps=12,training.logging_steps=4,training.eval_steps=6,training.save_steps=6,"
         "training.device=cpu")


def free_ports() -> int:
    """A master port whose next two ports (the steps' torchrun rendezvous) are free too."""
    import socket

    while True:
        port = free_port()
        try:
            for p in (port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def torchrun_nodes(port: int, lost_after_s: int = 60, launch: str = "torchrun") -> str:
    return (f"training.nodes.launch={launch},training.nodes.num_nodes=2,training.nodes.master_addr=127.0.0.1,"
            f"training.master_port={port},training.num_processes=1,training.nodes.lost_after_s={lost_after_s}")


def pinned_env() -> dict:
    # The two-node and the one-machine runs are compared bit for bit: pin the thread count, since the
    # reduction order of a matmul (and so its last bits) depends on it.
    return {**kedro_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_worker(root: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """Node 1, configured as a PyTorchJob configures torchrun: by the PET_* variables alone."""
    env = env or {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "PET_NNODES": "2"}
    return subprocess.Popen([FOOD_MULTIDS, "node-worker", *extra], cwd=root, env={**pinned_env(), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def start_kedro(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("kedro")), "run", *args], cwd=root, env=pinned_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def versions(folder: Path, name: str) -> list[dict]:
    return [json.loads((v / name).read_text()) for v in sorted(folder.iterdir())]


def comparable(records: list[dict]) -> list[dict]:
    return [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "images_per_second"}} for r in records]


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_two_nodes_train_like_one_machine_with_two_processes_and_evaluate_like_one_process(project_copy):
    out = project_copy / "data/06_models/train_output"
    port = free_ports()
    worker = start_worker(project_copy, port)
    started = time.time()
    # The default pipeline: data, training, the full evaluation and the report.
    two = kedro(project_copy, "--params", f"{SHORT},{torchrun_nodes(port)}", env=pinned_env())
    wall = time.time() - started
    worker_log, _ = worker.communicate(timeout=120)
    assert two.returncode == 0, (two.stdout + two.stderr)[-5000:] + worker_log[-3000:]
    assert worker.returncode == 0, worker_log[-5000:]
    # Node 1 ran every step of node 0 (training, the re-rank's full evaluation of each candidate, then the
    # full evaluation of the published model), each through torchrun on alternating ports, then exited.
    [reranked] = versions(project_copy / "data/06_models/candidate_evals.json", "candidate_evals.json")
    assert reranked["reranked"] and len(reranked["candidates"]) == 2  # evaluations at steps 6 and 12
    steps = re.findall(r"Node 1: step (\d+) done", worker_log)
    assert steps == ["0", "1", "2", "3"] and "node 0's run finished" in worker_log, worker_log[-3000:]
    ports = re.findall(r"torchrun --nnodes=2 --node-rank=1 --nproc-per-node=1 --master-addr=127.0.0.1 "
                       r"--master-port=(\d+)", worker_log)
    assert ports == [str(port + 1), str(port + 2)] * 2, worker_log[-3000:]
    assert not (out / "nodes").exists()  # nothing on the shared file system coordinates the nodes
    logger.warning("two-node kedro run (train, full evaluation, report): %.1f s", wall)  # shown with -rA or on failure

    one = kedro(project_copy, "--pipelines", "train", "--params",
                f"{SHORT},training.num_processes=2,training.output_dir=data/06_models/one_machine", env=pinned_env())
    assert one.returncode == 0, (one.stdout + one.stderr)[-5000:]
    first, second = versions(project_copy / "data/06_models/training_history.json", "training_history.json")
    assert comparable(first["records"]) == comparable(second["records"])
    assert first["best"]["step"] == second["best"]["step"]
    manifests = versions(project_copy / "data/06_models/checkpoint_manifest.json", "checkpoint_manifest.json")
    assert [m["world_size"] for m in manifests] == [2, 2]

    # The two-node model, evaluated again by one process.
    model_version = sorted(p.name for p in (project_copy / "data/06_models/best_model").iterdir())[0]
    alone = kedro(project_copy, "--pipelines", "full_eval", "--load-versions", f"best_model:{model_version}",
                  "--params", "training.num_processes=1,training.device=cpu", env=pinned_env())
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-5000:]
    metrics = versions(project_copy / "data/07_model_output/eval_metrics.json", "eval_metrics.json")
    across, single = metrics[0], metrics[-1]
    assert across["model_dir"] == single["model_dir"]
    scores = [k for k in across if isinstance(across[k], float)]
    assert {k for k in scores if k.endswith("_samples")} >= {"digits_samples", "shapes_samples", "overall_samples"}
    assert {k: across[k] for k in scores} == pytest.approx({k: single[k] for k in scores}, rel=1e-5, abs=1e-6)
    tables = [pd.read_parquet(v / "predictions.parquet")
              for v in sorted((project_copy / "data/07_model_output/predictions.parquet").iterdir())]
    a, b = (t.sort_values("sample_id").reset_index(drop=True) for t in (tables[0], tables[-1]))
    assert len(a) == len(b) == across["overall_samples"] and (a["prediction"] == b["prediction"]).all()

    # Predict (the demo's digits validation images through the newest best model) across the two nodes,
    # then in one process.
    # per_node: torchrun's old name, one release with a warning.
    port = free_ports()
    worker = start_worker(project_copy, port)
    spread = kedro(project_copy, "--pipelines", "predict", "--params",
                   f"training.device=cpu,{torchrun_nodes(port, launch='per_node')}", env=pinned_env())
    worker_log, _ = worker.communicate(timeout=120)
    assert spread.returncode == 0, (spread.stdout + spread.stderr)[-4000:] + worker_log[-2000:]
    assert worker.returncode == 0, (spread.stdout + spread.stderr)[-4000:] + worker_log[-2000:]
    assert "training.nodes.launch: per_node is now called torchrun" in spread.stdout + spread.stderr
    alone = kedro(project_copy, "--pipelines", "predict", "--params", "predict.num_processes=1,predict.device=cpu",
                  env=pinned_env())
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-4000:]
    spread_table, alone_table = (pd.read_parquet(v / "image_predictions.parquet") for v in
                                 sorted((project_copy / "data/07_model_output/image_predictions.parquet").iterdir()))
    assert len(spread_table) == len(alone_table) > 0
    assert spread_table["prediction"].tolist() == alone_table["prediction"].tolist()
    assert spread_table["confidence"].to_numpy() == pytest.approx(alone_table["confidence"].to_numpy(), abs=1e-6)


def training_run(steps: int, eval_steps: int, save_steps: int) -> str:
    return (f"training.max_steps={steps},training.logging_steps=4,training.eval_steps={eval_steps},"
            f"training.save_steps={save_steps},training.device=cpu")


class Output:
    """A process's output, read by a thread as it comes (the test waits for a line, then acts)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        self.thread.join(timeout=300)
        return "".join(self.lines)

    def has(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))


def start_two_nodes(root: Path, params: str, until) -> tuple[Path, subprocess.Popen, Output, subprocess.Popen]:
    """Node 1 (a worker) and node 0 (`kedro run --pipelines train`), returned once `until(output_dir, node 0's
    output)` holds."""
    out = root / "data/06_models/train_output"
    port = int(re.search(r"training.master_port=(\d+)", params).group(1))
    worker = start_worker(root, port)
    node0 = start_kedro(root, "--pipelines", "train", "--params", params)
    log = Output(node0)
    deadline = time.time() + 300
    while not until(out, log):
        assert time.time() < deadline and node0.poll() is None, "node 0 ended or timed out before the moment came"
        time.sleep(0.05)
    return out, worker, log, node0


def training_started(out: Path, log: Output) -> bool:
    return log.has(r"TRAIN step 4/")  # both nodes' ranks are in the process group and training


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it: a node whose machine went down."""
    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_a_lost_node_stops_node_zero_naming_its_rank_and_auto_resume_finishes(project_copy):
    long_run = training_run(steps=40, eval_steps=20, save_steps=4)
    out, worker, node0_log, node0 = start_two_nodes(project_copy, f"{long_run},{torchrun_nodes(free_ports(), 20)}",
                                                    lambda out, _: bool(complete_checkpoints(out)))
    kill_tree(worker.pid)
    killed_at = time.time()
    node0.wait(timeout=300)
    stopped_after = time.time() - killed_at
    log = node0_log.text()
    worker.wait()
    assert node0.returncode != 0 and not (out / "FINISHED.json").exists()
    assert re.search(r"lost rank\(s\) 1 on node 1 \(host \S+, node process \d+\)", log), log[-5000:]
    assert stopped_after < 60, stopped_after  # not a hang: the lost node is noticed well within a minute
    logger.warning("node 0 stopped %.1f s after node 1 was killed", stopped_after)
    step = complete_checkpoints(out)[-1][0]
    assert step < 40

    port = free_ports()
    worker = start_worker(project_copy, port)
    resumed = kedro(project_copy, "--pipelines", "train", "--params",
                    f"{long_run},{torchrun_nodes(port)},training.resume_from_checkpoint=auto", env=pinned_env())
    worker_log, _ = worker.communicate(timeout=120)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:] + worker_log[-3000:]
    assert worker.returncode == 0, worker_log[-3000:]
    assert re.search(rf"Resumed from \S+step-{step:08d}: step {step},", resumed.stdout + resumed.stderr)
    assert json.loads((out / "FINISHED.json").read_text())["final_step"] == 40


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_a_scheduler_sigterm_to_every_node_stops_them_together_with_a_checkpoint(project_copy):
    # As SLURM pre-empts a job: SIGTERM to the task on each node at once. Each node passes one SIGTERM to
    # its ranks (through torchrun), which agree on a step, save a checkpoint there and stop.
    out, worker, node0_log, node0 = start_two_nodes(
        project_copy, f"{training_run(400, 200, 200)},{torchrun_nodes(free_ports())}", training_started)
    for proc in (node0, worker):
        proc.send_signal(signal.SIGTERM)
    node0.wait(timeout=300)
    log = node0_log.text()
    worker_log, _ = worker.communicate(timeout=300)
    assert node0.returncode != 0 and worker.returncode != 0
    stopped = re.search(r"training stopped by SIGTERM at step (\d+) of 400; resumable checkpoint ([^;\s]+)", log)
    assert stopped, log[-4000:] + worker_log[-2000:]
    step = int(stopped.group(1))
    assert complete_checkpoints(out)[-1] == (step, Path(stopped.group(2))) and 0 < step < 400
    assert "stopped by SIGTERM" in worker_log
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_ranks_do_not_outlive_a_node_process_killed_outright(project_copy):
    # kedro on node 0 is SIGKILLed (out of memory, say): its torchrun and ranks must not go on training and
    # writing checkpoints; node 1 then loses node 0 (its store) and says so.
    out, worker, _, node0 = start_two_nodes(
        project_copy, f"{training_run(400, 200, 200)},{torchrun_nodes(free_ports(), 30)}", training_started)
    node0.kill()
    node0.wait()
    killed_at = time.time()
    leftovers = True
    while leftovers and time.time() - killed_at < 10:
        time.sleep(0.5)
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if str(out / "launch") in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, f"ranks still running {time.time() - killed_at:.0f} s after node 0 was killed"
    worker_log, _ = worker.communicate(timeout=120)
    assert worker.returncode == 1
    assert re.search(r"lost rank\(s\) 0 on node 0 \(host \S+, kedro process \d+\)", worker_log), worker_log[-3000:]


@pytest.mark.multinode
def test_a_worker_without_node_zero_gives_up_naming_the_address(tmp_path):
    port = free_ports()  # nothing listens there: node 0 not started, or a firewall
    started = time.time()
    proc = subprocess.run([FOOD_MULTIDS, "node-worker", "--master-addr", "127.0.0.1", "--master-port", str(port),
                           "--wait-s", "5"], env={**kedro_env(), "SLURM_NODEID": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and time.time() - started < 60, proc.stderr[-3000:]
    assert f"cannot reach node 0's store at 127.0.0.1:{port} within 5 s (--wait-s)" in proc.stderr, proc.stderr[-3000:]
    bare = {k: v for k, v in kedro_env().items() if not k.startswith(("PET_", "MASTER_", "NODE_RANK", "SLURM_"))}
    proc = subprocess.run([FOOD_MULTIDS, "node-worker"], env=bare, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no node rank: pass --node-rank" in proc.stderr and "no master address: pass --master-addr" in proc.stderr


@pytest.mark.multinode
def test_node_zero_refuses_a_second_worker_for_a_rank_and_names_a_node_that_never_came(base_params):
    from food_multids.runtime.node_zero import Session

    port = free_ports()
    nodes = {"launch": "torchrun", "num_nodes": 3, "master_addr": "127.0.0.1", "join_timeout_s": 20}
    params = {**base_params, "training": {**base_params["training"], "master_port": port, "nodes": nodes}}
    session = Session(ProjectConfig.from_params(params, check_files=False).training)
    try:
        first = start_worker(REPO, port, env={"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "127.0.0.1",
                                              "PET_MASTER_PORT": str(port)})
        deadline = time.time() + 60
        while not session.store.check(["node/1"]):
            assert time.time() < deadline and first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.1)
        claim = json.loads(session.store.get("node/1"))
        second = subprocess.run([FOOD_MULTIDS, "node-worker", "--node-rank", "1", "--master-addr", "127.0.0.1",
                                 "--master-port", str(port)], env=kedro_env(), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        assert (f"node rank 1 is already taken in the run at 127.0.0.1:{port} by {claim['host']} (process "
                f"{claim['pid']}): another worker was started as node 1") in second.stderr, second.stderr[-3000:]
        beyond = subprocess.run([FOOD_MULTIDS, "node-worker", "--node-rank", "5", "--master-addr", "127.0.0.1",
                                 "--master-port", str(port)], env=kedro_env(), capture_output=True, text=True,
                                timeout=60)
        assert beyond.returncode == 1
        assert "this is node 5, but node 0's run has 3 nodes (0..2)" in beyond.stderr, beyond.stderr[-3000:]
        # Node 2 never comes: the step fails before its record is published, and node 0's result goes where
        # node 1 waits (the record of step 0), not one past it.
        plan = NodePlan(3, 1, "127.0.0.1", port)
        with pytest.raises(NodeFailure,
                           match=r"node\(s\) 2 never joined within 20 s \(training.nodes.join_timeout_s\)"):
            session.run_step(plan, "food_multids.training.worker", "/nowhere/spec.json", {})
        session.finish(ok=False, message="RuntimeError: multi-node launch failed: node(s) 2 never joined")
        log, _ = first.communicate(timeout=60)
        assert first.returncode == 1, log[-3000:]
        assert "node 0's run failed: RuntimeError: multi-node launch failed: node(s) 2 never joined" in log, log[-3000:]
    finally:
        if session.store is not None:
            session.finish(ok=False)


def test_the_node_plan_comes_from_settings_or_the_schedulers_environment(base_params, monkeypatch):
    for name in ("PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NODE_RANK",
                 "NNODES", "SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_NODEID",
                 "JOB_COMPLETION_INDEX", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)

    def plan(**nodes):
        params = {**base_params, "training": {**base_params["training"], "nodes": {"launch": "torchrun", **nodes}}}
        return resolve_plan(TrainConfig.from_section(params["training"]), 4)

    with pytest.raises(NodeFailure,
                       match="training.nodes.num_nodes is not set and none of PET_NNODES, NNODES, SLURM_NNODES"):
        plan()
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    got = plan()
    assert (got.num_nodes, got.master_addr, got.master_port, got.procs_per_node) == (3, "10.0.0.7", 29500, 4)
    assert got.ranks_of(2) == [8, 9, 10, 11] and got.node_of(9) == 2
    assert plan(num_nodes=2, master_addr="n0").num_nodes == 2 and plan(master_addr="n0").master_addr == "n0"
    monkeypatch.setenv("SLURM_NODEID", "2")
    with pytest.raises(NodeFailure, match=r"this machine is node 2 \(SLURM_NODEID=2\), but `kedro run` runs on node 0"):
        plan()
    monkeypatch.setenv("PET_NODE_RANK", "0")  # torchrun's own variable first
    monkeypatch.setenv("PET_MASTER_PORT", "29400")
    assert plan().master_port == 29400 and plan().step_port(0) == 29401 and plan().step_port(3) == 29402
    params = {**base_params, "training": {**base_params["training"], "hostfile": "h", "nodes": {"launch": "torchrun"}}}
    with pytest.raises(ConfigError, match="params:training.hostfile must be null with training.nodes.launch: torchrun"):
        ProjectConfig.from_params(params, check_files=False)


def test_the_readme_recipes_use_settings_and_flags_the_code_has(base_params):
    import yaml

    from food_multids.runtime.cluster import (
        MASTER_ADDR_VARS,
        MASTER_PORT_VARS,
        NODE_RANK_VARS,
        NUM_NODES_VARS,
    )

    readme = (REPO / "README.md").read_text()
    section = readme.split("### Several machines", 1)[1].split("\n## ", 1)[0]
    recipes = re.findall(r"```(?:bash|yaml)\n(.*?)```", section, flags=re.S)
    assert len(recipes) == 3

    def recipe_config(recipe: str) -> ProjectConfig:
        (overrides,) = re.findall(r"kedro run --env gpu --params (\S+)", recipe)
        params = copy.deepcopy(base_params)
        for item in overrides.split(","):
            key, value = item.split("=")
            section_ = params
            *parents, last = key.split(".")
            for name in parents:
                section_ = section_.setdefault(name, {})
            section_[last] = yaml.safe_load(value)
        return ProjectConfig.from_params(params, check_files=False)  # raises on an unknown key or a bad value

    slurm, kubernetes, pytorchjob = recipes
    cfg = recipe_config(slurm)  # Kedro in the batch script, exec'd so that the time-limit signal reaches it
    assert cfg.training.launch_mode() == "slurm" and cfg.training.resume_from_checkpoint == "auto"
    assert "#SBATCH --signal=B:TERM@" in slurm and "exec .venv/bin/kedro run" in slurm and "node-worker" not in slurm
    cfg = recipe_config(kubernetes)
    assert '[ "$JOB_COMPLETION_INDEX" = 0 ]' in kubernetes and "JOB_COMPLETION_INDEX" in NODE_RANK_VARS
    assert cfg.training.launch_mode() == "torchrun" and cfg.training.resume_from_checkpoint == "auto"
    assert "exec .venv/bin/food-multids node-worker" in kubernetes
    for name in ("NNODES", "MASTER_ADDR", "MASTER_PORT"):  # what the Job's pods are given, read by both sides
        assert f"{{name: {name}," in kubernetes and name in (*NUM_NODES_VARS, *MASTER_ADDR_VARS, *MASTER_PORT_VARS)
    # A PyTorchJob: the operator sets the PET_* variables, which node 0 and the worker read first.
    job = yaml.safe_load(pytorchjob)
    master, worker = (job["spec"]["pytorchReplicaSpecs"][k]["template"]["spec"]["containers"][0]["command"]
                      for k in ("Master", "Worker"))
    (overrides,) = [master[i + 1] for i, arg in enumerate(master) if arg == "--params"]
    cfg = recipe_config(f"kedro run --env gpu --params {overrides}")
    assert master[:3] == [".venv/bin/kedro", "run", "--env"] and cfg.training.launch_mode() == "torchrun"
    assert worker == [".venv/bin/food-multids", "node-worker"]
    assert (NODE_RANK_VARS[0], NUM_NODES_VARS[0], MASTER_ADDR_VARS[0], MASTER_PORT_VARS[0]) == \
        ("PET_NODE_RANK", "PET_NNODES", "PET_MASTER_ADDR", "PET_MASTER_PORT")
    help_text = subprocess.run([FOOD_MULTIDS, "node-worker", "--help"], capture_output=True, text=True).stdout
    assert all(flag in help_text for flag in ("--node-rank", "--master-addr", "--master-port", "--nnodes", "--wait-s"))


def test_the_torchrun_commands_from_the_plan_and_the_settings(base_params, monkeypatch):
    from food_multids.runtime.launch import launcher_command
    from food_multids.runtime.node_zero import torchrun_argv

    plan = NodePlan(num_nodes=4, procs_per_node=8, master_addr="10.0.0.5", master_port=29500)
    cmd = torchrun_argv(plan, 3, 5, 600, "food_multids.training.worker", "/shared/launch/spec.json")
    assert cmd[0].endswith("torchrun")
    # Step 5 is odd: port + 2 (even steps + 1): never the previous step's rendezvous, never the run's store.
    assert cmd[1:] == ["--nnodes=4", "--node-rank=3", "--nproc-per-node=8", "--master-addr=10.0.0.5",
                       "--master-port=29502", "--max-restarts=0", "--rdzv-backend=static", "--rdzv-conf=timeout=600",
                       "--shutdown-timeout=300",
                       "-m", "food_multids.training.worker", "--spec", "/shared/launch/spec.json"]

    def config(**training):
        return TrainConfig.from_section({**base_params["training"], **training})

    spec = Path("/shared/launch/spec.json")
    one = launcher_command(config(), 2, spec)
    assert one[0].endswith("torchrun") and one[1:] == ["--nproc-per-node=2", "--max-restarts=0",
                                                       "--shutdown-timeout=300",
                                                       "--standalone", "-m", "food_multids.training.worker", "--spec",
                                                       str(spec)]
    pinned = launcher_command(config(master_port=29600), 2, spec)
    assert pinned[4:8] == ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", "--master-port=29600"]
    monkeypatch.chdir(REPO)
    ssh = launcher_command(config(hostfile="conf/gpu/hostfile"), 8, spec)
    assert ssh[0].endswith("deepspeed") and ssh[1:4] == ["--num_gpus", "8", "--hostfile"]
    assert ssh[-4:] == ["--module", "food_multids.training.worker", "--spec", str(spec)]


@pytest.mark.slow
def test_a_launcher_gets_sigterm_when_the_process_that_started_it_is_killed_outright(tmp_path):
    # The launcher side of "no rank trains on unwatched": PR_SET_PDEATHSIG, without the ranks' own watch.
    starter = subprocess.Popen([sys.executable, "-c", (
        "import signal, subprocess, time\n"
        "from food_multids.runtime.cluster import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '120'], preexec_fn=die_with_parent(signal.SIGTERM))\n"
        "print(child.pid, flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(starter.stdout.readline()))
    assert child.is_running() and child.name() == "sleep"
    starter.kill()
    starter.wait()
    gone, _ = psutil.wait_procs([child], timeout=10)
    assert gone, "the launcher outlived the process that started it"
