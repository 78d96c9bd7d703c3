"""Several machines, as two nodes on this one: `kedro run` as node 0 and `food-multids node-worker` as node 1,
each starting its own DeepSpeed launcher (`--no_ssh`, gloo on 127.0.0.1, one CPU process per node)."""

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

from food_multids.config import ConfigError, ProjectConfig
from food_multids.runtime.nodes import NodeFailure, resolve_plan
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import free_port, kedro, kedro_env

REPO = Path(__file__).resolve().parents[2]
FOOD_MULTIDS = str(Path(sys.executable).with_name("food-multids"))
logger = logging.getLogger(__name__)
SHORT = ("training.max_steps=12,training.logging_steps=4,training.eval_steps=6,training.save_steps=6,"
         "training.device=cpu")


def per_node(port: int, lost_after_s: int = 60) -> str:
    return ("training.nodes.launch=per_node,training.nodes.num_nodes=2,training.nodes.master_addr=127.0.0.1,"
            f"training.master_port={port},training.num_processes=1,training.nodes.lost_after_s={lost_after_s}")


def pinned_env() -> dict:
    # The two-node and the one-machine runs are compared bit for bit: pin the thread count, since the
    # reduction order of a matmul (and so its last bits) depends on it.
    return {**kedro_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_worker(root: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([FOOD_MULTIDS, "node-worker", "--output-dir", str(output_dir), *extra], cwd=root,
                            env={**pinned_env(), "NODE_RANK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


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
    worker = start_worker(project_copy, out)
    started = time.time()
    # The default pipeline: data, training, the full evaluation and the report.
    two = kedro(project_copy, "--params", f"{SHORT},{per_node(free_port())}", env=pinned_env())
    wall = time.time() - started
    worker_log, _ = worker.communicate(timeout=120)
    assert two.returncode == 0, (two.stdout + two.stderr)[-5000:] + worker_log[-3000:]
    assert worker.returncode == 0, worker_log[-5000:]
    # Node 1 joined every launch of node 0 (training, the re-rank's full evaluation of each candidate, then
    # the full evaluation of the published model), then exited with the run.
    [reranked] = versions(project_copy / "data/06_models/candidate_evals.json", "candidate_evals.json")
    assert reranked["reranked"] and len(reranked["candidates"]) == 2  # evaluations at steps 6 and 12
    launches = len(re.findall(r"Node 1: launch \S+ done", worker_log))
    assert launches == 1 + 2 + 1 and "node 0's run finished" in worker_log, worker_log[-3000:]
    logger.warning("two-node kedro run (train, full evaluation, report): %.1f s", wall)  # shown with -rA or on failure

    one = kedro(project_copy, "--pipelines", "train", "--params",
                f"{SHORT},training.num_processes=2,training.output_dir=data/06_models/one_machine", env=pinned_env())
    assert one.returncode == 0, (one.stdout + one.stderr)[-5000:]
    first, second = versions(project_copy / "data/06_models/training_history.json", "training_history.json")
    assert comparable(first["records"]) == comparable(second["records"]) and first["best"]["step"] == second["best"]["step"]
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
    worker = start_worker(project_copy, out)
    spread = kedro(project_copy, "--pipelines", "predict", "--params", f"training.device=cpu,{per_node(free_port())}",
                   env=pinned_env())
    worker_log, _ = worker.communicate(timeout=120)
    assert spread.returncode == 0 and worker.returncode == 0, (spread.stdout + spread.stderr)[-4000:] + worker_log[-2000:]
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


def start_two_nodes(root: Path, params: str, until) -> tuple[Path, subprocess.Popen, subprocess.Popen]:
    """Node 1 (a worker) and node 0 (`kedro run --pipelines train`), returned once `until(output_dir)` holds."""
    out = root / "data/06_models/train_output"
    worker = start_worker(root, out)
    node0 = start_kedro(root, "--pipelines", "train", "--params", params)
    deadline = time.time() + 300
    while not until(out):
        assert time.time() < deadline and node0.poll() is None, "node 0 ended or timed out before the moment came"
        time.sleep(0.05)
    return out, worker, node0


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
    out, worker, node0 = start_two_nodes(project_copy, f"{long_run},{per_node(free_port(), 20)}",
                                         lambda out: bool(complete_checkpoints(out)))
    kill_tree(worker.pid)
    killed_at = time.time()
    log, _ = node0.communicate(timeout=300)
    stopped_after = time.time() - killed_at
    worker.wait()
    assert node0.returncode != 0 and not (out / "FINISHED.json").exists()
    assert re.search(r"lost rank\(s\) 1 on node 1 \(host \S+, node process \d+\)", log), log[-5000:]
    assert stopped_after < 60, stopped_after  # not a hang: the lost node is noticed well within a minute
    logger.warning("node 0 stopped %.1f s after node 1 was killed", stopped_after)
    step = complete_checkpoints(out)[-1][0]
    assert step < 40

    worker = start_worker(project_copy, out)
    resumed = kedro(project_copy, "--pipelines", "train", "--params",
                    f"{long_run},{per_node(free_port())},training.resume_from_checkpoint=auto", env=pinned_env())
    worker_log, _ = worker.communicate(timeout=120)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:] + worker_log[-3000:]
    assert worker.returncode == 0, worker_log[-3000:]
    assert re.search(rf"Resumed from \S+step-{step:08d}: step {step},", resumed.stdout + resumed.stderr)
    assert json.loads((out / "FINISHED.json").read_text())["final_step"] == 40


@pytest.mark.multinode
@pytest.mark.threads_pinned
def test_a_scheduler_sigterm_to_every_node_stops_them_together_with_a_checkpoint(project_copy):
    # As SLURM pre-empts a job: SIGTERM to the task on each node at once. Each node passes one SIGTERM to
    # its ranks, which agree on a step, save a checkpoint there and stop.
    joined = lambda out: bool(list((out / "nodes").glob("*/joined-rank-1")))  # noqa: E731
    out, worker, node0 = start_two_nodes(project_copy, f"{training_run(400, 200, 200)},{per_node(free_port())}", joined)
    time.sleep(3)  # a few training steps
    for proc in (node0, worker):
        proc.send_signal(signal.SIGTERM)
    log, _ = node0.communicate(timeout=300)
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
    # kedro on node 0 is SIGKILLed (out of memory, say): its ranks, in a session of their own, must not go
    # on training and writing checkpoints; node 1 then loses node 0 and says so.
    joined = lambda out: bool(list((out / "nodes").glob("*/joined-rank-1")))  # noqa: E731
    # lost_after_s 30: node 1 cannot be what stops node 0's ranks inside the 10 s allowed below.
    out, worker, node0 = start_two_nodes(project_copy, f"{training_run(400, 200, 200)},{per_node(free_port(), 30)}",
                                         joined)
    node0.kill()
    node0.wait()
    killed_at = time.time()
    leftovers = True
    while leftovers and time.time() - killed_at < 10:
        time.sleep(0.5)
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(out / "launch") in " ".join(p.info["cmdline"] or [])
                     and p.pid != worker.pid]
    assert not leftovers, f"ranks still running {time.time() - killed_at:.0f} s after node 0 was killed"
    worker_log, _ = worker.communicate(timeout=120)
    assert worker.returncode == 1
    assert re.search(r"lost rank\(s\) 0 on node 0|node 0 \(\S+\) failed", worker_log), worker_log[-3000:]


@pytest.mark.multinode
def test_a_worker_without_node_zero_gives_up_with_a_message(tmp_path):
    started = time.time()
    proc = subprocess.run([FOOD_MULTIDS, "node-worker", "--output-dir", str(tmp_path / "out"), "--wait-s", "2"],
                          env={**kedro_env(), "SLURM_NODEID": "1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.time() - started < 30
    assert f"no launch from node 0 appeared in {tmp_path / 'out' / 'nodes'} within 2 s (--wait-s)" in proc.stderr


def beating(node_dir: Path, stop: threading.Event) -> None:
    beat = 0
    while not stop.is_set():
        beat += 1
        (node_dir / "node-0.json").write_text(json.dumps({"node": 0, "host": "h0", "pid": 1, "beat": beat,
                                                          "state": "running", "message": "", "ranks": [0]}))
        time.sleep(0.5)


@pytest.mark.multinode
def test_a_node_that_cannot_reach_the_master_fails_after_the_join_timeout(tmp_path, base_params):
    # Node 0 is alive (its heartbeat runs here) but nothing listens at the master address: as behind a
    # firewall. The worker's rank keeps trying to connect until the join timeout stops it.
    board = tmp_path / "out" / "nodes"
    node_dir = board / "launch-1"
    node_dir.mkdir(parents=True)
    (node_dir / "hostfile").write_text("node-0 slots=1\nnode-1 slots=1\n")
    spec = tmp_path / "spec.json"
    params = {**base_params, "training": {**base_params["training"], "device": "cpu"}}
    spec.write_text(json.dumps({"parameters": params, "launch_dir": str(tmp_path), "model_dir": str(tmp_path)}))
    port = free_port()
    post = {"state": "open", "id": "launch-1", "session": "s", "posted_by": "h0", "project_root": "",
            "plan": {"num_nodes": 2, "procs_per_node": 1, "master_addr": "127.0.0.1", "master_port": port},
            "cmd_tail": ["--module", "food_multids.inference.worker", "--spec", str(spec)],
            "timeouts": {"join_timeout_s": 8, "lost_after_s": 60}}
    stop = threading.Event()
    thread = threading.Thread(target=beating, args=(node_dir, stop), daemon=True)
    thread.start()
    (board / "board.json").write_text(json.dumps(post))
    try:
        started = time.time()
        proc = subprocess.run([FOOD_MULTIDS, "node-worker", "--output-dir", str(tmp_path / "out"), "--node-rank", "1",
                               "--wait-s", "30"], env=kedro_env(), capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"the process group at 127.0.0.1:{port} did not form within 8 s (training.nodes.join_timeout_s): "
            f"rank(s) 0, 1 on node(s) 0, 1 did not join; node(s) 1 cannot connect to the master at 127.0.0.1:{port}: "
            "check that node 0 (h0) is reachable from there on that port") in proc.stderr
    assert time.time() - started < 60
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(spec) in " ".join(p.info["cmdline"] or [])]


def test_the_node_plan_comes_from_settings_or_the_schedulers_environment(base_params, monkeypatch):
    for name in ("NNODES", "SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_NODEID",
                 "JOB_COMPLETION_INDEX", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)

    def plan(**nodes):
        params = {**base_params, "training": {**base_params["training"], "nodes": {"launch": "per_node", **nodes}}}
        return resolve_plan(ProjectConfig.from_params(params, check_files=False), 4)

    with pytest.raises(NodeFailure, match="training.nodes.num_nodes is not set and neither NNODES nor SLURM_NNODES"):
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
    params = {**base_params, "training": {**base_params["training"], "hostfile": "h", "nodes": {"launch": "per_node"}}}
    with pytest.raises(ConfigError, match="params:training.hostfile must be null with training.nodes.launch: per_node"):
        ProjectConfig.from_params(params, check_files=False)


def test_the_readme_recipes_use_settings_and_flags_the_code_has(base_params):
    import yaml

    from food_multids.runtime.nodes import NODE_RANK_VARS, NUM_NODES_VARS

    readme = (REPO / "README.md").read_text()
    section = readme.split("### Several machines", 1)[1].split("\n## ", 1)[0]
    recipes = re.findall(r"```(?:bash|yaml)\n(.*?)```", section, flags=re.S)
    assert len(recipes) == 2
    gpu_output_dir = yaml.safe_load((REPO / "conf/gpu/parameters.yml").read_text())["training"]["output_dir"]

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

    slurm, kubernetes = recipes
    cfg = recipe_config(slurm)  # Kedro in the batch script, exec'd so that the time-limit signal reaches it
    assert cfg.training.launch_mode() == "slurm" and cfg.training.resume_from_checkpoint == "auto"
    assert "#SBATCH --signal=B:TERM@" in slurm and "exec .venv/bin/kedro run" in slurm and "node-worker" not in slurm
    cfg = recipe_config(kubernetes)
    assert '[ "$JOB_COMPLETION_INDEX" = 0 ]' in kubernetes and "JOB_COMPLETION_INDEX" in NODE_RANK_VARS
    assert cfg.training.launch_mode() == "per_node" and cfg.training.resume_from_checkpoint == "auto"
    assert re.findall(r"food-multids node-worker --output-dir (\S+)", kubernetes) == [gpu_output_dir]
    assert "NNODES" in kubernetes and "NNODES" in NUM_NODES_VARS and "SLURM_NNODES" in NUM_NODES_VARS
    help_text = subprocess.run([FOOD_MULTIDS, "node-worker", "--help"], capture_output=True, text=True).stdout
    assert all(flag in help_text for flag in ("--output-dir", "--node-rank", "--wait-s"))
