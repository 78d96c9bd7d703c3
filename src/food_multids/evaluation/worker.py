"""Entry point of each full-evaluation process started by a launcher (several GPUs)."""

from __future__ import annotations

from pathlib import Path

from food_multids.evaluation.full import run_full_evaluation
from food_multids.runtime.device import finish_distributed
from food_multids.runtime.files import write_json_atomic
from food_multids.runtime.launch import RESULT_FILE, worker_context


def main(argv: list[str] | None = None) -> None:
    ctx = worker_context(argv)
    result = run_full_evaluation(ctx.cfg, Path(ctx.spec["model_dir"]), ctx.frame("full_eval"))
    if ctx.rank == 0:
        result.predictions.to_parquet(ctx.launch / "predictions.parquet")
        result.confusions.to_parquet(ctx.launch / "confusions.parquet")
        write_json_atomic(ctx.launch / RESULT_FILE, {"metrics": result.metrics,
                                                     "calibration_curves": result.calibration_curves})
    finish_distributed()


if __name__ == "__main__":
    main()
