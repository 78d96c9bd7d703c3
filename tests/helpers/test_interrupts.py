"""The training loop's stop flag: one request per signal, however many times the launchers deliver it."""

from __future__ import annotations

import os
import signal
import time

from food_multids.helpers.interrupts import StopFlag


def test_the_same_signal_delivered_twice_is_one_request_and_a_later_one_stops_at_once(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    monkeypatch.setattr(StopFlag, "REPEAT_WINDOW_S", 0.5)
    try:
        flag = StopFlag()
        with flag.active():
            os.kill(os.getpid(), signal.SIGTERM)  # from slurmstepd
            os.kill(os.getpid(), signal.SIGTERM)  # and again from torchrun, forwarding it
            assert flag.signum == signal.SIGTERM and calls == []  # stop after this step, with a checkpoint
            time.sleep(0.6)
            os.kill(os.getpid(), signal.SIGTERM)  # a person sending it again: stop at once
            assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
