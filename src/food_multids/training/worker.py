"""Entry point of each training process started by the DeepSpeed launcher (see launcher.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.training.checkpoint import write_json_atomic
from food_multids.training.launcher import RESULT_FILE
from food_multids.training.loop import Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] rank{rank} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(args.spec.read_text())
    launch = Path(spec["launch_dir"])
    cfg = ProjectConfig.from_params(spec["parameters"], check_files=False)
    frames = {name: pd.read_parquet(launch / f"{name}.parquet") for name in ("train", "eval_subset", "full_eval")}
    trainer = Trainer(cfg, frames["train"], frames["eval_subset"], frames["full_eval"],
                      os.environ.get("MLFLOW_RUN_ID") or None, os.environ.get("MLFLOW_TRACKING_URI") or None)
    result = trainer.run()
    if trainer.is_main:
        write_json_atomic(launch / RESULT_FILE, {"history": result.history, "manifest": result.manifest})


if __name__ == "__main__":
    main()
