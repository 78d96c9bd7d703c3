"""Who may write to training.output_dir, whether it can be written at all, and what a new run does with
what an earlier one left there (resume it, clear it, or refuse to lose it: prepare_output_dir).

One training run at a time owns an output directory: `OutputDirLock` holds an exclusive `flock` on
`<output_dir>/.lock` for the whole run and writes the holder's PID, host, start time and command
into it. The kernel drops the lock when the holder dies (SIGKILL included), so a lock left by a dead
process is taken over, with a log line naming it. flock is per host: two machines sharing the folder
over NFS are not kept apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from food_multids.config import TrainConfig
from food_multids.config.paths import resolve_path
from food_multids.helpers.interrupts import RunInterrupted
from food_multids.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
FINISHED = "FINISHED.json"  # written by a run that reached its last step


class OutputDirError(RuntimeError):
    """The output directory is in use, not writable, or holds work that would be lost."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"PID {holder.get('pid')} on {holder.get('host')}, started {started} "
            f"({' '.join(holder.get('command', []))[:200]})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """Context manager: exclusive ownership of an output directory for one run."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.path = output_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputDirLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirError(
                f"training.output_dir {self.output_dir} is in use by another run: {_describe(holder)}. Wait for it "
                "to finish, or set training.output_dir to another folder") from None
        previous = _read_holder(fd)
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _pid_alive(previous["pid"]):
            logger.warning("Taking over the lock of %s: left by %s, which is no longer running", self.output_dir,
                           _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (json.JSONDecodeError, OSError):
        return {}


def check_writable(output_dir: Path) -> None:
    """Create the folder and write, fsync and remove a probe file; an error names the folder and the cause."""
    probe = output_dir / f".write-probe-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"probe")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"training.output_dir {output_dir} is not writable ({exc.strerror or exc}): point "
                             "training.output_dir at a writable folder") from exc


@contextlib.contextmanager
def reporting_write_failure(what: str, path: Path) -> Iterator[None]:
    """Turn any failure while writing `what` to `path` (OSError, torch's RuntimeError, safetensors'
    SafetensorError ...) into an OutputDirError naming both; a stop by signal passes through."""
    try:
        yield
    except RunInterrupted:
        raise
    except Exception as exc:
        raise describe_write_failure(what, path, exc) from exc


def describe_write_failure(what: str, path: Path, exc: BaseException) -> OutputDirError:
    """An error for a failed checkpoint/model write that names the path and, when the disk is full, says so.

    torch.save reports a full disk as RuntimeError('... file write failed'), so free space is checked
    whatever the exception type.
    """
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 64 * 1024 * 1024
    cause = (f"no space left on the device ({free / 2**20:.1f} MiB free): free space, lower "
             "training.save_total_limit, or point training.output_dir at a larger disk") if full else \
        f"{type(exc).__name__}: {exc} ({free / 2**20:.1f} MiB free there)"
    return OutputDirError(f"writing the {what} to {path} failed: {cause}")


def prepare_output_dir(output_dir: Path, training: TrainConfig, is_main: bool, barrier: Callable[[], None]
                       ) -> Path | None:
    """The checkpoint a run resumes from (training.resume_from_checkpoint), or None: then an earlier run's
    files are cleared (clear_earlier_run). Every rank calls it; rank 0 alone deletes, between barriers."""
    resume = training.resume_from_checkpoint
    source = None
    if resume == "auto":
        finished = (output_dir / FINISHED).is_file()
        source = None if finished else ckpt.latest_checkpoint(output_dir)
        if source is None and is_main:
            logger.info("resume_from_checkpoint=auto: %s", "previous run finished, starting fresh" if finished
                        else f"no complete checkpoint in {output_dir}, starting fresh")
    elif isinstance(resume, str) and resume:
        source = resolve_path(resume)
        if not (source / ckpt.COMPLETE).is_file():
            raise FileNotFoundError(f"params:training.resume_from_checkpoint: {source} is not a complete "
                                    f"checkpoint (no {ckpt.COMPLETE}); complete ones: "
                                    f"{[str(p) for _, p in ckpt.complete_checkpoints(output_dir)]}")
    if is_main and output_dir.exists():
        for staged in output_dir.glob(".best-staging-*"):  # a kill while a best model was written
            shutil.rmtree(staged, ignore_errors=True)
    if source is None:
        clear_earlier_run(output_dir, training, is_main, barrier)
    output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return source


def clear_earlier_run(output_dir: Path, training: TrainConfig, is_main: bool, barrier: Callable[[], None]) -> None:
    """Remove a finished earlier run's files; refuse to delete an unfinished one's unless told to."""
    names = ("checkpoints", "best", ckpt.BEST_POINTER, FINISHED)
    leftovers = [p for p in output_dir.iterdir() if p.name in names] if output_dir.is_dir() else []
    finished = (output_dir / FINISHED).is_file()
    done, best = ckpt.complete_checkpoints(output_dir), ckpt.read_best_pointer(output_dir)
    # resume_from_checkpoint: auto found nothing to resume; false (the default) must not discard work:
    # a complete checkpoint or a best model.
    keep = not training.overwrite_output_dir and training.resume_from_checkpoint is False
    if (done or best) and not finished and keep:
        raise OutputDirError(
            f"training.output_dir {output_dir} holds an unfinished run (complete checkpoints at steps "
            f"{[s for s, _ in done]}, best model at step {best['step'] if best else None}); set "
            "training.resume_from_checkpoint: auto to continue it, or training.overwrite_output_dir: true to "
            "discard it")
    barrier()  # every rank has decided before rank 0 deletes anything
    if not is_main or not leftovers:
        return
    logger.warning("Starting fresh in %s: removing %s of an earlier %s run", output_dir,
                   [p.name for p in leftovers], "finished" if finished else "unfinished")
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
