"""SIGINT / SIGTERM as a clean stop: an exception at a safe point instead of a dead process.

SIGTERM is how clusters pre-empt jobs and Ctrl-C sends SIGINT. Python's default turns SIGINT into
KeyboardInterrupt (not an Exception, so Kedro's error hooks never see it and MLflow's exit handler
marks the run FINISHED) and SIGTERM kills outright (the run stays RUNNING). Two layers:
- `raise_on_signals()`: for the whole pipeline, the signal raises `RunInterrupted` where the code is.
- `StopFlag`: inside training, the signal only sets a flag; the loop checks it after an optimizer step,
  saves a resumable checkpoint and raises `TrainingInterrupted`.
A second signal while a stop is pending falls back to the previous handler (stop at once).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(RuntimeError):
    """The run was stopped by a signal (outside a training loop's safe points)."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


class TrainingInterrupted(RunInterrupted):
    """Training stopped by a signal after saving a resumable checkpoint."""


@contextlib.contextmanager
def _handlers(handler: Callable[[int, object], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    # A signal set to be ignored (e.g. SIGINT for `kedro run &` in some shells) stays ignored.
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        raise RunInterrupted(signum)

    with _handlers(handler):
        yield


class StopFlag:
    """Set by SIGINT/SIGTERM while active; the training loop polls `signum` (a plain attribute read)."""

    # The same signal again within this many seconds is the same request, delivered twice: a SLURM step
    # signalled with `scancel --signal` reaches a rank from slurmstepd (proctrack/linuxproc signals the
    # whole step) and again from torchrun, which forwards it. Only a later one means "stop at once".
    REPEAT_WINDOW_S = 3.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        with _handlers(self._handle):
            yield self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum == signum and time.monotonic() - self._at < self.REPEAT_WINDOW_S:
            return  # one request, delivered twice
        if self.signum is not None:  # second signal: behave as before training started
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum, self._at = signum, time.monotonic()
        logger.warning("Received %s: stopping after this optimizer step and saving a checkpoint "
                       "(send it again to stop at once)", signal.Signals(signum).name)
