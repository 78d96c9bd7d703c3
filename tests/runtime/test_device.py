"""Joining the process group on CPU: no JIT build of DeepSpeed's shared-memory op, so neither the first
run's silent compile nor a lock left by a killed builder can hold a run up."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

JOIN = """
import torch
from food_multids.runtime.device import init_distributed, finish_distributed
print("joined", init_distributed(torch.device("cpu")), flush=True)
finish_distributed()
"""


@pytest.mark.slow  # a real process joining a gloo group
def test_a_lock_left_by_a_killed_deepspeed_build_does_not_hold_up_the_next_run(tmp_path):
    extensions = tmp_path / "torch_extensions"
    for abi in ("py311_cpu", "py310_cpu", "py312_cpu"):  # a killed builder's lock, wherever torch looks
        (extensions / abi / "deepspeed_shm_comm").mkdir(parents=True)
        (extensions / abi / "deepspeed_shm_comm" / "lock").touch()
    env = {**os.environ,
           "TORCH_EXTENSIONS_DIR": str(extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu")}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        raise AssertionError("init_distributed waited on the stale torch_extensions lock") from err
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "joined (0, 1)" in proc.stdout
    assert "built successfully" not in proc.stdout + proc.stderr
    assert not list(extensions.rglob("*.so")), "DeepSpeed built its shm op"
    assert time.monotonic() - started < 60
