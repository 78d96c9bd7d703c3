"""Partial vs full evaluation time: the evaluation loop on the eval subsets vs the full validation
sets, for the demo and for a larger set built by repeating the demo's validation rows.

    .venv/bin/python bench/eval_partial_vs_full.py [--repeat 10]

Run after `make run` (uses the latest best model and eval sets from the catalog). The time ratio
should track the row ratio set by eval_ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch.utils.data import DataLoader

from food_multids.config import ProjectConfig
from food_multids.data.collator import create_collator
from food_multids.data.dataset import RecordDataset
from food_multids.data.sampler import ShardedEvalSampler
from food_multids.data.tables import stratified_subset
from food_multids.model.classifier import MultiDatasetClassifier
from food_multids.model.loading import load_tokenizer
from food_multids.runtime.device import init_distributed
from food_multids.runtime.scoring import evaluate

ROOT = Path(__file__).resolve().parents[1]


def latest(name: str) -> Path:
    folder = ROOT / name
    return sorted(folder.iterdir())[-1] / folder.name


def timed_eval(model, frame, encoder, collate, n_datasets, batch) -> float:
    loader = DataLoader(RecordDataset(frame, encoder), batch_sampler=ShardedEvalSampler(len(frame), batch),
                        collate_fn=collate)
    start = time.perf_counter()
    evaluate(model, loader, torch.device("cpu"), n_datasets, top_k=5, progress_mode="never")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10, help="copies of the demo val rows in the larger set")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    cfg = ProjectConfig.from_params(params, check_files=False)
    init_distributed(torch.device("cpu"))
    model_dir = latest("data/06_models/best_model")
    model = MultiDatasetClassifier.from_pretrained(model_dir)
    encoder, collate = create_collator(model_dir, cfg.model, load_tokenizer(model_dir), model.meta.prompt)
    full = pd.read_parquet(latest("data/05_model_input/full_eval_set.parquet"))
    subset = pd.read_parquet(latest("data/05_model_input/eval_subset.parquet"))
    batch = cfg.training.per_device_eval_batch_size
    n = len(cfg.datasets)
    timed_eval(model, subset, encoder, collate, n, batch)  # warm-up
    big = pd.concat([full.assign(sample_id=full["sample_id"] + (k << 32)) for k in range(args.repeat)],
                    ignore_index=True)
    big_subset = stratified_subset(big, cfg.datasets, seed=0)
    for label, part, whole in (("demo", subset, full), (f"demo x{args.repeat}", big_subset, big)):
        t_part = timed_eval(model, part, encoder, collate, n, batch)
        t_full = timed_eval(model, whole, encoder, collate, n, batch)
        print(f"{label:>10}: subset {len(part):6,} rows {t_part:6.2f} s ({len(part) / t_part:6.1f} img/s) | "
              f"full {len(whole):6,} rows {t_full:6.2f} s ({len(whole) / t_full:6.1f} img/s) | "
              f"time ratio {t_part / t_full:.3f} vs row ratio {len(part) / len(whole):.3f}")


if __name__ == "__main__":
    main()
