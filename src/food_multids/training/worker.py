"""Entry point of each training process started by a launcher (see run.py)."""

from __future__ import annotations

import os
import signal

from food_multids.helpers.interrupts import TrainingInterrupted
from food_multids.runtime.device import finish_distributed, join_process_group
from food_multids.runtime.launch import worker_context, write_result
from food_multids.training.loop import Trainer


def main(argv: list[str] | None = None) -> None:
    ctx = worker_context(argv)
    cfg = ctx.cfg
    trainer = Trainer(cfg, join_process_group(cfg), ctx.frame("train"), ctx.frame("eval_subset"),
                      ctx.frame("full_eval"), os.environ.get("MLFLOW_RUN_ID") or None,
                      os.environ.get("MLFLOW_TRACKING_URI") or None)
    try:
        result = trainer.run()
    except TrainingInterrupted as exc:
        # Every rank stopped at the same agreed step, with its checkpoint: a planned end, told to the parent
        # in the result (which raises it there), exit 0, so that no launcher prints a failure of its own.
        # The signal may still be on its way to a rank that stopped because another rank got it first (the
        # ranks agree at a logging step): from here on it must not kill this rank in the middle of the
        # shutdown, which the others wait for.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if trainer.is_main:
            write_result(ctx.launch, {"interrupted": str(exc), "signum": int(exc.signum)})
        finish_distributed()
        return
    if trainer.is_main:
        write_result(ctx.launch, {"history": result.history, "manifest": result.manifest})
    finish_distributed()


if __name__ == "__main__":
    main()
