"""Requests batched together: the served model's micro-batcher.

MLflow's server runs each request in a thread of its own. Each thread decodes its own images, then
`MicroBatcher.submit`s its records and waits. There is no batching thread: the first waiting request
becomes the leader, waits up to `max_wait_s` for others (or until `max_batch` records are pending),
takes records from the front of the queue (arrival order; a request larger than `max_batch` is split
over several batches), runs one forward pass for all of them outside the lock, hands each request its
rows and steps down; the next waiting request then leads. So one batch runs at a time, nobody waits
behind a later arrival, and a request whose client has gone still finishes without holding anyone up.

Back-pressure: with `max_queue` records already waiting, a new request is refused at once
(`QueueFull`, HTTP 503 from the served model) instead of growing memory. A request alone in an empty
queue is always taken, however large (predict.max_request_pixels bounds it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


class QueueFull(RuntimeError):
    """Too many records are waiting: the client should retry later."""


@dataclass(eq=False)
class _Job:
    records: pd.DataFrame
    taken: int = 0  # records already put into a batch
    parts: list[pd.DataFrame] = field(default_factory=list)
    finished: int = 0  # records whose rows came back
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.finished == len(self.records)


class MicroBatcher:
    def __init__(self, run_batch: Callable[[pd.DataFrame], pd.DataFrame], max_batch: int, max_wait_s: float,
                 max_queue: int):
        """`run_batch(records) -> one output row per record, in order` (records' sample_id renumbered)."""
        self.run_batch, self.max_batch, self.max_wait_s, self.max_queue = run_batch, max_batch, max_wait_s, max_queue
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._leading = False
        self.batches = 0  # forward passes run (for tests and the bench)

    def pending(self) -> int:
        """Records waiting, not yet in a batch."""
        return sum(len(job.records) - job.taken for job in self._queue)

    def submit(self, records: pd.DataFrame) -> pd.DataFrame:
        """This request's output rows, once its records have been through the model."""
        job = _Job(records.reset_index(drop=True))
        with self._cond:
            waiting = self.pending()
            if waiting and waiting + len(records) > self.max_queue:
                raise QueueFull(f"the server is busy: {waiting} images are queued and this request adds "
                                f"{len(records)} (predict.serve_max_queue {self.max_queue}); retry in a moment")
            self._queue.append(job)
            self._cond.notify_all()
            while not job.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch: list[tuple[_Job, int, int]] = []
                try:
                    batch = self._gather()
                finally:
                    if not batch:
                        self._leading = False
                        self._cond.notify_all()
                if batch:
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._leading = False
                        self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return pd.concat(job.parts, ignore_index=True) if len(job.parts) > 1 else job.parts[0].reset_index(drop=True)

    def _gather(self) -> list[tuple[_Job, int, int]]:
        """(job, start, stop) slices of up to max_batch records from the front; called holding the lock, which
        it releases while waiting for more requests."""
        deadline = time.monotonic() + self.max_wait_s
        while self.pending() < self.max_batch and (left := deadline - time.monotonic()) > 0:
            self._cond.wait(left)
        batch, room = [], self.max_batch
        for job in self._queue:
            if room == 0:
                break
            take = min(room, len(job.records) - job.taken)
            if take:
                batch.append((job, job.taken, job.taken + take))
                job.taken += take
                room -= take
        while self._queue and self._queue[0].taken == len(self._queue[0].records):
            self._queue.popleft()
        return batch

    def _run(self, batch: list[tuple[_Job, int, int]]) -> None:
        """One forward pass for every slice; each job gets its rows (or the batch's exception)."""
        try:
            records = pd.concat([job.records.iloc[start:stop] for job, start, stop in batch], ignore_index=True)
            records["sample_id"] = np.arange(len(records), dtype=np.int64)  # unique across the requests
            out = self.run_batch(records)
            if len(out) != len(records):
                raise RuntimeError(f"the batch gave {len(out)} rows for {len(records)} records")
        except BaseException as exc:  # every request of the batch fails with it ...
            with self._cond:
                failed = {id(job) for job, _, _ in batch}
                for job, _, _ in batch:
                    job.error = exc
                # ... and the part of a split request not yet run leaves the queue with it: it has no one
                # waiting for it, and must not run (and fail) in an innocent request's batch.
                self._queue = deque(job for job in self._queue if id(job) not in failed)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the leader's thread stops
                raise
            return
        self.batches += 1
        at = 0
        with self._cond:
            for job, start, stop in batch:
                job.parts.append(out.iloc[at:at + stop - start])
                job.finished += stop - start
                at += stop - start
