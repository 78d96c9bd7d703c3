"""The launch spec carries what a rank needs explicitly: the node's parameter sections and the project root."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from food_multids.config import TrainConfig
from food_multids.config.paths import find_project_root
from food_multids.runtime.launch import worker_context


def kedro_project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'x'\n")
    return folder


def test_a_rank_resolves_relative_settings_against_the_root_its_launch_spec_names(tmp_path, monkeypatch):
    project, elsewhere = kedro_project(tmp_path / "project"), kedro_project(tmp_path / "elsewhere")
    monkeypatch.chdir(elsewhere)  # the rank's current directory is another project
    spec = tmp_path / "spec.json"
    sections = {"training": {"output_dir": "data/out"}}
    spec.write_text(json.dumps({"parameters": sections, "launch_dir": str(tmp_path), "project_root": str(project)}))
    ctx = worker_context(["--spec", str(spec)])
    assert ctx.params == sections
    assert TrainConfig.from_section(ctx.params["training"]).resolved_output_dir() == project / "data/out"
    # Another machine without that path: the search from the current directory, as before.
    spec.write_text(json.dumps({"parameters": sections, "launch_dir": str(tmp_path),
                                "project_root": str(tmp_path / "not-here")}))
    from food_multids.config.paths import use_project_root

    use_project_root(None)
    worker_context(["--spec", str(spec)])
    assert find_project_root() == elsewhere


def test_the_kedro_hook_sets_the_sessions_project_root_for_this_process(tmp_path, monkeypatch):
    from food_multids.framework.hooks import ProjectHooks

    project, elsewhere = kedro_project(tmp_path / "project"), kedro_project(tmp_path / "elsewhere")
    monkeypatch.chdir(elsewhere)
    assert find_project_root() == elsewhere
    ProjectHooks().after_context_created(SimpleNamespace(project_path=project, config_loader={}))
    assert find_project_root() == project
    assert TrainConfig.from_section({"output_dir": "out"}).resolved_output_dir() == project / "out"


def test_every_worker_answers_through_one_result_convention(tmp_path):
    import pandas as pd

    from food_multids.runtime.launch import RESULT_FILE, read_result, write_result

    table = pd.DataFrame({"row": [0, 1], "prediction": [3, -1]})
    write_result(tmp_path, {"metrics": {"overall_accuracy": 0.5}}, {"predictions": table})
    assert json.loads((tmp_path / RESULT_FILE).read_text())["frames"] == ["predictions"]
    values, frames = read_result(tmp_path)
    assert values == {"metrics": {"overall_accuracy": 0.5}} and list(frames) == ["predictions"]
    pd.testing.assert_frame_equal(frames["predictions"], table)
    write_result(tmp_path, {"history": []})  # a worker without tables: none read back
    assert read_result(tmp_path) == ({"history": []}, {})


LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
sys.exit(rank.wait())
"""
RANK = """
import pathlib, signal, sys, time
mark = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    mark.write_text(str(signum))
    if "{ignore}" != "yes":
        sys.exit(0)
signal.signal(signal.SIGTERM, stop)
mark.with_suffix(".ready").touch()
while True:
    time.sleep(0.05)
"""


def start_launcher(tmp_path, ignore: bool):
    import subprocess
    import sys
    import time

    mark = tmp_path / "rank.signal"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK.replace("{ignore}", "yes" if ignore else "no"),
                             str(mark)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not mark.with_suffix(".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, mark


def test_a_stop_passes_the_signal_to_the_ranks_once_and_waits_for_them(tmp_path):
    import signal

    from food_multids.runtime.cluster import stop_gracefully

    proc, mark = start_launcher(tmp_path, ignore=False)
    stop_gracefully(proc, signal.SIGTERM)
    assert mark.read_text() == str(int(signal.SIGTERM))  # the rank got it and stopped on its own
    assert proc.returncode == 0  # the launcher was not killed: its rank ended and so did it
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # Kedro's own handlers are back


def test_ranks_that_do_not_stop_within_the_grace_are_killed(tmp_path, monkeypatch, caplog):
    import signal

    from food_multids.runtime import cluster

    monkeypatch.setattr(cluster, "STOP_GRACE_S", 1)
    proc, mark = start_launcher(tmp_path, ignore=True)
    cluster.stop_gracefully(proc, signal.SIGTERM)
    assert mark.read_text() == str(int(signal.SIGTERM)) and proc.returncode == -signal.SIGKILL
    assert "did not stop within 1 s of the signal: killed" in caplog.text
