"""Entry point of each full-evaluation process started by a launcher (several GPUs)."""

from __future__ import annotations

from pathlib import Path

from food_multids.evaluation.full import run_full_evaluation
from food_multids.runtime.device import finish_distributed
from food_multids.runtime.launch import worker_context, write_result


def main(argv: list[str] | None = None) -> None:
    ctx = worker_context(argv)
    result = run_full_evaluation(ctx.cfg, Path(ctx.spec["model_dir"]), ctx.frame("full_eval"))
    if ctx.rank == 0:
        write_result(ctx.launch, {"metrics": result.metrics, "calibration_curves": result.calibration_curves},
                     {"predictions": result.predictions, "confusions": result.confusions})
    finish_distributed()


if __name__ == "__main__":
    main()
