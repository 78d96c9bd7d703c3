"""Who may write to training.output_dir, and whether it can be written at all.

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
from collections.abc import Iterator
from pathlib import Path

from food_multids.helpers.interrupts import RunInterrupted

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


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
