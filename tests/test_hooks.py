"""Project hooks under real `kedro run` processes: a damaged MLflow store, Ctrl-C during training."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from food_multids.framework.hooks import MlflowStoreError, check_sqlite_store
from food_multids.training.checkpoint import complete_checkpoints
from tests.conftest import KEDRO, kedro, kedro_env


def make_store(path: Path) -> None:
    client = MlflowClient(f"sqlite:///{path}")
    run = client.create_run(client.create_experiment("x"))
    for step in range(200):
        client.log_metric(run.info.run_id, "m", float(step), step=step)


def test_a_truncated_store_is_named_with_the_way_out(tmp_path):
    store = tmp_path / "mlflow.db"
    make_store(store)
    check_sqlite_store(store)  # intact: no error
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlflowStoreError, match=rf"the MLflow store {store} is truncated .*mv {store} {store}.damaged"):
        check_sqlite_store(store)
    store.write_bytes(b"not a database at all" * 10)
    with pytest.raises(MlflowStoreError, match="is not an sqlite database"):
        check_sqlite_store(store)


def test_a_page_damaged_store_is_named(tmp_path):
    store = tmp_path / "mlflow.db"
    make_store(store)
    page = int.from_bytes(store.read_bytes()[16:18], "big")
    with store.open("r+b") as fh:  # overwrite the schema page's body, keeping the file header
        fh.seek(100)
        fh.write(b"\xff" * (page - 100))
    with pytest.raises(MlflowStoreError, match=rf"the MLflow store {store} cannot be read \(.*\)"):
        check_sqlite_store(store)
    with pytest.raises(sqlite3.DatabaseError):  # what MLflow itself would have met
        sqlite3.connect(store).execute("SELECT name FROM sqlite_master").fetchall()


@pytest.mark.e2e
def test_kedro_run_names_a_truncated_store_before_any_node(project_copy):
    store = project_copy / "mlflow.db"
    make_store(store)
    store.write_bytes(store.read_bytes()[:5000])
    proc = subprocess.run([KEDRO, "run", "--pipelines", "data"], cwd=project_copy, env=kedro_env(),
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert f"the MLflow store {store} is truncated" in output, output[-3000:]
    assert "Traceback" not in output and output.count("is truncated") == 1, output[-3000:]
    assert not (project_copy / "data/02_intermediate/train_records.parquet").exists()


@pytest.mark.e2e
def test_ctrl_c_during_training_saves_a_checkpoint_and_marks_the_run_killed(project_copy):
    out_dir = project_copy / "data/06_models/train_output"
    proc = subprocess.Popen([KEDRO, "run", "--pipelines", "train", "--params", "training.save_steps=10"],
                            cwd=project_copy, env=kedro_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]  # a shell's code for SIGINT, as schedulers read a stopped job
    assert "training stopped by SIGINT at step" in output, output[-3000:]
    assert "Traceback" not in output and "failed with error" not in output, output[-3000:]
    assert output.rstrip().splitlines()[-1].startswith("Error: training stopped by SIGINT at step"), output[-3000:]
    assert not (out_dir / "FINISHED.json").exists()
    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("food_multids").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    # the stop step's own checkpoint: past the periodic one of step 10, unless the signal arrived between that
    # save and the step's stop check (a fast machine), where step 10's checkpoint is the stop step's
    stop_step = int(re.search(r"training stopped by SIGINT at step (\d+)", output).group(1))
    assert stop_step >= 10
    assert complete_checkpoints(out_dir)[-1][0] == stop_step, output[-3000:]


def test_a_pinned_best_model_brings_the_history_and_info_of_its_own_run(tmp_path, caplog):
    import json

    from kedro.io import DataCatalog

    from food_multids.framework.hooks import pin_companions

    conf = {name: {"type": "json.JSONDataset", "filepath": f"data/{name}.json", "versioned": True}
            for name in ("training_history", "best_model_info", "checkpoint_manifest")}
    for version in ("2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"):
        for name in ("training_history", "best_model_info"):  # no checkpoint_manifest of the older run
            path = tmp_path / f"data/{name}.json/{version}/{name}.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"version": version}))
    absolute = {n: {**c, "filepath": str(tmp_path / c["filepath"])} for n, c in conf.items()}
    now = "2026-03-01T00.00.00.000Z"  # this session's save version
    catalog = DataCatalog.from_config(absolute, save_version=now)
    assert catalog.load("training_history") == {"version": "2026-02-01T00.00.00.000Z"}  # newest by default
    pin_companions(catalog, conf, {"best_model": "2026-01-01T00.00.00.000Z"}, now, tmp_path)
    assert catalog.load("training_history") == {"version": "2026-01-01T00.00.00.000Z"}
    assert catalog.load("best_model_info") == {"version": "2026-01-01T00.00.00.000Z"}
    assert "checkpoint_manifest has no version 2026-01-01T00.00.00.000Z" in caplog.text
    explicit = DataCatalog.from_config(absolute, save_version=now)
    pin_companions(explicit, conf, {"best_model": "2026-01-01T00.00.00.000Z",
                                    "training_history": "2026-02-01T00.00.00.000Z"}, now, tmp_path)
    assert explicit.load("training_history") == {"version": "2026-02-01T00.00.00.000Z"}  # the user's pin wins


@pytest.mark.e2e
def test_bad_rows_found_by_a_node_end_the_run_in_one_message_without_a_traceback(project_copy):
    train = project_copy / "data/01_raw/demo/digits/train.jsonl"
    with train.open("a") as fh:
        fh.write('{"image": "images/train/0_000.png", "label": "x", "dataset_name": "digits"}\n')
        fh.write('{"image": "images/train/missing.png", "label": 3, "dataset_name": "digits"}\n')
    proc = kedro(project_copy, "--pipelines", "data")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Error: 2 bad input row(s) (data.on_bad_rows=error" in output
    assert "non-integer label: label 'x' is a string" in output and "missing.png" in output
    assert output.count("2 bad input row(s)") == 1  # once: not also in Kedro's node-failure log line
    assert "Traceback" not in output and "Repeat the previous command" not in output


def launched_processes(out_dir: Path) -> list:
    """Processes still working for the run in `out_dir` (the launcher and its ranks name the launch folder)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if str(out_dir / "launch") in " ".join(p.info["cmdline"] or [])]


LONG_TWO_PROCESSES = "training.save_steps=10,training.num_processes=2,training.max_steps=3000,training.eval_steps=3000"


@pytest.mark.e2e
def test_ctrl_c_in_the_terminal_stops_two_processes_at_one_step_with_its_checkpoint_and_leaves_no_rank(project_copy):
    # A terminal's Ctrl-C signals the whole foreground process group. Kedro passes it to the ranks once (they
    # are in a session of their own: a rank signalled twice would stop at once, without its checkpoint).
    out_dir = project_copy / "data/06_models/train_output"
    proc = subprocess.Popen([KEDRO, "run", "--pipelines", "train", "--params", LONG_TWO_PROCESSES], cwd=project_copy,
                            env=kedro_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]
    # The ranks stop at the agreed step and exit 0, so torchrun reports no failure of its own: one message.
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]
    stopped = re.search(r"training stopped by SIGINT at step (\d+) of 3000; resumable checkpoint ([^;\s]+)", output)
    assert stopped, output[-4000:]
    assert complete_checkpoints(out_dir)[-1] == (int(stopped.group(1)), Path(stopped.group(2)))
    assert not launched_processes(out_dir)
    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("food_multids").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


@pytest.mark.e2e
def test_ranks_do_not_outlive_a_kedro_killed_outright(project_copy):
    out_dir = project_copy / "data/06_models/train_output"
    proc = subprocess.Popen([KEDRO, "run", "--pipelines", "train", "--params", LONG_TWO_PROCESSES], cwd=project_copy,
                            env=kedro_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(out_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert launched_processes(out_dir)
    proc.kill()  # out of memory, say
    proc.wait()
    killed_at = time.time()
    while launched_processes(out_dir) and time.time() - killed_at < 15:
        time.sleep(0.5)
    assert not launched_processes(out_dir), \
        f"ranks still running {time.time() - killed_at:.0f} s after kedro was killed"
