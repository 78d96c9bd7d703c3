"""Adaptive mixing against the temperature mix: same data, steps and seeds (issue 32).

For each mix (temperature T=1, temperature T=2, adaptive with signal eval_loss, adaptive with signal
train_loss) and each seed (training.seed: the head's initialisation and the batch order), train the tiny
model and score the best model on the full validation set: per-dataset accuracy, the worst dataset's and
the mean over datasets. Two sets:

- demo: digits (300 train rows, 10 classes) + shapes (400 rows, 40 classes)
- generated, three datasets of unequal difficulty and size: digits (600 rows, medium), shapes (200 rows,
  40 classes: hard and small), colours (900 rows, 6 colours: easy and large)

Prints mean +- 95 % interval over seeds (t), and for each adaptive variant its paired difference from
T=2 per seed with its interval: a gain is claimed only where that interval excludes 0.

  .venv/bin/python bench/mixing.py                 # after `make setup` (about 10 minutes on 2 cores)
  SEEDS=3 EPOCHS=4 .venv/bin/python bench/mixing.py
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SEEDS = int(os.environ.get("SEEDS", "5"))
EPOCHS = int(os.environ.get("EPOCHS", "6"))
MIXES = {"temperature T=1": {"mix_strategy": "temperature", "mix_temperature": 1.0},
         "temperature T=2": {"mix_strategy": "temperature", "mix_temperature": 2.0},
         "adaptive eval_loss": {"mix_strategy": "adaptive", "mix_temperature": 2.0,
                                "mix_adaptive": {"signal": "eval_loss"}},
         "adaptive train_loss": {"mix_strategy": "adaptive", "mix_temperature": 2.0,
                                 "mix_adaptive": {"signal": "train_loss"}}}
# t quantiles (two-sided 95 %) by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def write_colours(root: Path, per_class_train: int, per_class_val: int, seed: int = 7) -> None:
    """6 saturated colours with jitter: easy."""
    import json

    rng = np.random.default_rng(seed)
    base = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (30, 210, 220)]
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        rows = []
        for label, colour in enumerate(base):
            for k in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 41, size=(56, 56, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{split}/{label}_{k:03d}.png"
                (root / "colours" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / "colours" / rel)
                rows.append({"image": rel, "label": label, "dataset_name": "colours"})
        (root / "colours" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def base_params(out: Path) -> dict:
    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    params["model"]["name_or_path"] = str(ROOT / params["model"]["name_or_path"])
    params["training"].update(output_dir=str(out), progress_bar="never", num_train_epochs=EPOCHS,
                              overwrite_output_dir=True, keep_top_k_checkpoints=1, save_steps=100_000)
    params["tracking"]["report_to"] = []
    return params


def demo_set(out: Path) -> dict:
    params = base_params(out)
    for key in ("train_jsonl_list", "val_jsonl_list"):
        params["data"][key] = [str(ROOT / p) for p in params["data"][key]]
    return params


def generated_set(root: Path, out: Path) -> dict:
    from food_multids.data.demo import write_digits, write_shapes

    write_digits(root, per_class_train=60, per_class_val=20, seed=5)
    write_shapes(root, per_class_train=5, per_class_val=3, seed=6)
    write_colours(root, per_class_train=150, per_class_val=30)
    params = base_params(out)
    names = ("digits", "shapes", "colours")
    params["data"]["train_jsonl_list"] = [str(root / n / "train.jsonl") for n in names]
    params["data"]["val_jsonl_list"] = [str(root / n / "val.jsonl") for n in names]
    params["datasets"]["dataset_configs"] = {
        "digits": {"num_classes": 10, "eval_ratio": 0.5}, "shapes": {"num_classes": 40, "eval_ratio": 0.5},
        "colours": {"num_classes": 6, "eval_ratio": 0.5}}
    params["training"]["eval_steps"] = 50
    return params


def run(params: dict, mix: dict, seed: int) -> dict[str, float]:
    from food_multids.config import ProjectConfig
    from food_multids.evaluation.full import run_full_evaluation
    from food_multids.pipelines import node_sections
    from food_multids.pipelines.data.nodes import run_data_nodes
    from food_multids.pipelines.train.nodes import train_deepspeed

    params = copy.deepcopy(params)
    params["data"].update(copy.deepcopy(mix))
    params["training"]["seed"] = seed
    train_set, _, subset, full = run_data_nodes(params)
    _, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))
    cfg = ProjectConfig.from_params(params, check_files=False)
    metrics = run_full_evaluation(cfg, Path(manifest["best"]["path"]), full).metrics
    accs = {n: metrics[f"{n}_accuracy"] for n in cfg.dataset_names}
    return {**accs, "worst": min(accs.values()), "mean": float(np.mean(list(accs.values())))}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))


def compare(name: str, params: dict) -> None:
    results = {mix: [run(params, setting, seed) for seed in range(SEEDS)] for mix, setting in MIXES.items()}
    keys = list(results["temperature T=2"][0])
    print(f"\n== {name}: {SEEDS} seeds, {EPOCHS} epochs; full-set accuracy, mean +- 95 % interval")
    print(f"{'mix':<22}" + "".join(f"{k:>18}" for k in keys))
    for mix, runs in results.items():
        cells = [interval([r[k] for r in runs]) for k in keys]
        print(f"{mix:<22}" + "".join(f"{m:>10.4f} +-{h:.4f}" for m, h in cells))
    for mix in ("adaptive eval_loss", "adaptive train_loss"):
        for key in ("worst", "mean"):
            diffs = [a[key] - b[key] for a, b in zip(results[mix], results["temperature T=2"], strict=True)]
            mean, half = interval(diffs)
            verdict = ("gain" if mean - half > 0 else "loss" if mean + half < 0
                       else "no difference the interval can tell")
            print(f"{mix} - temperature T=2, {key}: {mean:+.4f} +- {half:.4f} ({verdict})")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        compare("demo (digits + shapes)", demo_set(Path(tmp) / "out"))
        compare("generated (digits 600 + shapes 200 + colours 900 train rows)",
                generated_set(Path(tmp) / "data", Path(tmp) / "out3"))


if __name__ == "__main__":
    main()
