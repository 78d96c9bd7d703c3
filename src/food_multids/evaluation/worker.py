"""Entry point of each full-evaluation process started by the DeepSpeed launcher (several GPUs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.evaluation.full import run_full_evaluation
from food_multids.training.checkpoint import write_json_atomic
from food_multids.training.launcher import RESULT_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] rank{rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(args.spec.read_text())
    launch = Path(spec["launch_dir"])
    cfg = ProjectConfig.from_params(spec["parameters"], check_files=False)
    result = run_full_evaluation(cfg, Path(spec["model_dir"]), pd.read_parquet(launch / "full_eval.parquet"))
    if rank == 0:
        result.predictions.to_parquet(launch / "predictions.parquet")
        result.confusions.to_parquet(launch / "confusions.parquet")
        write_json_atomic(launch / RESULT_FILE, {"metrics": result.metrics})


if __name__ == "__main__":
    main()
