"""Who owns training.output_dir: concurrent runs, unfinished work, read-only and full disks, tampered checkpoints."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from food_multids.pipelines import node_sections
from food_multids.pipelines.data.nodes import run_data_nodes
from food_multids.pipelines.train.nodes import train_deepspeed
from food_multids.training import checkpoint as ckpt
from food_multids.training.output_dir import LOCK_FILE, OutputDirError, OutputDirLock

pytestmark = pytest.mark.slow


@pytest.fixture
def params(demo_params) -> dict:
    demo_params["training"].update(max_steps=2, logging_steps=1, eval_steps=2, save_steps=2)
    return demo_params


@pytest.fixture(scope="module")
def data(base_params, demo_root):
    p = copy.deepcopy(base_params)
    p["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    p["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    train_set, _, subset, full = run_data_nodes(p)
    return train_set, subset, full


def hold_lock(directory: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from food_multids.training.output_dir import OutputDirLock\n"
            "with OutputDirLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_a_busy_output_dir_is_refused_and_a_dead_holders_lock_is_taken_over(params, data, caplog):
    out = Path(params["training"]["output_dir"])
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputDirError,
                           match=rf"{out} is in use by another run: PID {holder.pid} on .*training.output_dir"):
            train_deepspeed(*data, **node_sections(train_deepspeed, params))
        assert not (out / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead holder's record is still there
    _, manifest = train_deepspeed(*data, **node_sections(train_deepspeed, params))
    assert manifest["final_step"] == 2
    assert f"left by PID {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert (out / LOCK_FILE).read_text() == ""  # released


def test_an_unfinished_run_is_kept_unless_resumed_or_overwritten(params, data):
    out = Path(params["training"]["output_dir"])
    train_deepspeed(*data, **node_sections(train_deepspeed, params))
    (out / "FINISHED.json").unlink()  # as after a crash
    (out / ".best-staging-9").mkdir()  # as after a kill while the best model was written
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(OutputDirError,
                       match=r"holds an unfinished run \(complete checkpoints at steps \[2\], best model "
                                             r"at step 2\); set training.resume_from_checkpoint: auto "
                                             r".*overwrite_output_dir: true"):
        train_deepspeed(*data, **node_sections(train_deepspeed, params))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before and (out / "best.json").is_file()
    params["training"]["overwrite_output_dir"] = True
    _, manifest = train_deepspeed(*data, **node_sections(train_deepspeed, params))
    assert manifest["final_step"] == 2 and not (out / ".best-staging-9").exists()


def test_a_tampered_checkpoint_file_is_named_before_anything_loads_it(params, data):
    out = Path(params["training"]["output_dir"])
    train_deepspeed(*data, **node_sections(train_deepspeed, params))
    (out / "FINISHED.json").unlink()
    path = ckpt.latest_checkpoint(out)
    states = next(path.rglob("mp_rank_00_model_states.pt"))
    states.write_bytes(states.read_bytes() + b"crafted")
    params["training"].update(resume_from_checkpoint="auto", max_steps=4)
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"{states} has changed since it was written"):
        train_deepspeed(*data, **node_sections(train_deepspeed, params))
    extra = states.parent / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states.write_bytes(states.read_bytes()[: -len(b"crafted")])
    extra.write_bytes(b"not ours")
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"{extra} was not written by the run"):
        train_deepspeed(*data, **node_sections(train_deepspeed, params))
    extra.unlink()
    _, manifest = train_deepspeed(*data, **node_sections(train_deepspeed, params))  # intact again: resumes
    assert manifest["final_step"] == 4


def test_a_read_only_output_dir_is_refused_before_training(params, data, small_mount):
    target = small_mount("size=1m,ro")
    params["training"]["output_dir"] = str(target / "out")
    with pytest.raises(OutputDirError,
                       match=rf"training.output_dir {target / 'out'} is not writable \(Read-only file system\)"):
        train_deepspeed(*data, **node_sections(train_deepspeed, params))


def test_a_full_disk_names_the_path_being_written(params, data, small_mount):
    target = small_mount("size=1m")
    params["training"]["output_dir"] = str(target / "out")
    with pytest.raises(OutputDirError, match=rf"writing the (best model|checkpoint of step 2) to {target / 'out'}/\S+ "
                                             r"failed: no space left on the device"):
        train_deepspeed(*data, **node_sections(train_deepspeed, params))
    assert not ckpt.complete_checkpoints(target / "out")


def test_lock_file_names_the_holder(tmp_path):
    with OutputDirLock(tmp_path / "o"):
        holder = json.loads((tmp_path / "o" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["started"] <= time.time()


def test_a_batch_larger_than_a_dataset_is_a_warning(params, data, caplog):
    digits_rows = int((data[0]["dataset_name"] == "digits").sum())
    params["training"].update(per_device_train_batch_size=digits_rows + 1, max_steps=1, eval_steps=1, save_steps=1)
    train_deepspeed(*data, **node_sections(train_deepspeed, params))
    assert f"fewer training rows than one global batch ({digits_rows + 1} = {digits_rows + 1} per device x 1): " \
           f"{{'digits': {digits_rows}" in caplog.text
