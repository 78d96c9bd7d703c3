"""Long-tailed data: each training.loss against plain cross-entropy, and what calibration buys (issue 30).

The demo's two datasets regenerated long-tailed (seeded): class c of a K-class dataset keeps
round(max * ratio^(-c / (K - 1))) training images (digits 60 -> 4, 15:1; shapes 20 -> 2, 10:1); the
validation sets stay balanced, so top-1 accuracy there is also the macro accuracy's estimate and a loss
that serves the rare classes shows. For each objective (ce, focal, class_balanced, each with and without
label smoothing 0.1; ce and class_balanced with a weight average, training.ema) and each seed (training.seed:
the head's initialisation and the batch order), the same steps; the best model is calibrated
(evaluation/calibration.py) and scored on the full validation sets: per dataset top-1 and macro accuracy
(mean per-class recall), ECE before and after temperature scaling (on the images the fit did not use), the
accuracy of the most confident 80 %; and the training throughput (img/s) of each objective next to plain CE,
measured in the same run.

  .venv/bin/python bench/longtail.py            # after `make setup` (about 9 minutes on 2 cores)
  SEEDS=5 EPOCHS=8 .venv/bin/python bench/longtail.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDS = int(os.environ.get("SEEDS", "3"))
EPOCHS = int(os.environ.get("EPOCHS", "6"))
EMA = {"decay": 0.98, "start_step": 40}  # runs of about 200 steps: a short average
LOSSES = {  # training settings per configuration: training.loss, and training.ema where named
    "ce": {"loss": {"type": "ce"}},
    "ce + smoothing 0.1": {"loss": {"type": "ce", "label_smoothing": 0.1}},
    "focal (gamma 2)": {"loss": {"type": "focal", "focal_gamma": 2.0}},
    "focal + smoothing": {"loss": {"type": "focal", "focal_gamma": 2.0, "label_smoothing": 0.1}},
    "class_balanced": {"loss": {"type": "class_balanced", "class_balanced_beta": 0.99}},
    "class_balanced + smoothing": {"loss": {"type": "class_balanced", "class_balanced_beta": 0.99,
                                            "label_smoothing": 0.1}},
    "ce + EMA": {"loss": {"type": "ce"}, "ema": EMA},
    "class_balanced + EMA": {"loss": {"type": "class_balanced", "class_balanced_beta": 0.99}, "ema": EMA},
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def long_tail(root: Path) -> dict[str, int]:
    """The demo's generators, then each training file cut to the exponential profile. Returns max/min per set."""
    from food_multids.data.demo import write_digits, write_shapes

    write_digits(root, per_class_train=60, per_class_val=20, seed=5)
    write_shapes(root, per_class_train=20, per_class_val=4, seed=6)
    ratios = {}
    for name, classes, ratio in (("digits", 10, 15.0), ("shapes", 40, 10.0)):
        path = root / name / "train.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        by_class: dict[int, list] = {}
        for row in rows:
            by_class.setdefault(row["label"], []).append(row)
        top = max(len(v) for v in by_class.values())
        keep = {c: max(1, round(top * ratio ** (-c / (classes - 1)))) for c in by_class}
        kept = [r for c, rs in sorted(by_class.items()) for r in rs[:keep[c]]]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        ratios[name] = (max(keep.values()), min(keep.values()), len(kept))
    return ratios


def params_for(root: Path, out: Path) -> dict:
    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    params["model"]["name_or_path"] = str(ROOT / params["model"]["name_or_path"])
    params["training"].update(output_dir=str(out), progress_bar="never", num_train_epochs=EPOCHS,
                              overwrite_output_dir=True, keep_top_k_checkpoints=1, save_steps=100_000,
                              eval_steps=40)
    params["tracking"]["report_to"] = []
    params["data"]["train_jsonl_list"] = [str(root / n / "train.jsonl") for n in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(root / n / "val.jsonl") for n in ("digits", "shapes")]
    params["datasets"]["dataset_configs"] = {"digits": {"num_classes": 10, "eval_ratio": 0.5},
                                             "shapes": {"num_classes": 40, "eval_ratio": 0.5}}
    return params


def run(params: dict, settings: dict, seed: int) -> dict[str, float]:
    from food_multids.config import ProjectConfig
    from food_multids.evaluation.calibration import calibrate_model
    from food_multids.evaluation.full import run_full_evaluation
    from food_multids.pipelines import node_sections
    from food_multids.pipelines.data.nodes import run_data_nodes
    from food_multids.pipelines.train.nodes import train_deepspeed

    params = copy.deepcopy(params)
    params["training"].update(seed=seed, **copy.deepcopy(settings))
    train_set, _, subset, full = run_data_nodes(params)
    history, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))
    cfg = ProjectConfig.from_params(params, check_files=False)
    best = Path(manifest["best"]["path"])
    calibrate_model(cfg, best, full)
    result = run_full_evaluation(cfg, best, full)
    metrics, preds = result.metrics, result.predictions
    out: dict[str, float] = {}
    for name in cfg.dataset_names:
        mine = preds[preds["dataset_name"] == name]
        recall = (mine["prediction"] == mine["label"]).groupby(mine["label"]).mean()
        out.update({f"{name} top1": metrics[f"{name}_accuracy"], f"{name} macro": float(recall.mean()),
                    f"{name} ECE raw": metrics[f"{name}_ece"], f"{name} ECE cal": metrics[f"{name}_ece_calibrated"],
                    f"{name} acc@80%": metrics[f"{name}_selective_accuracy_at_80"]})
    speeds = [r["metrics"]["images_per_second"] for r in history["records"] if r["kind"] == "train"][1:]
    out["img/s"] = float(np.median(speeds)) if speeds else math.nan
    return out


def interval(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))


def main() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shape = long_tail(root)
        params = params_for(root, Path(tmp) / "out")
        results = {name: [run(params, settings, seed) for seed in range(SEEDS)] for name, settings in LOSSES.items()}
    print("\n== long-tailed demo: "
          f"{', '.join(f'{n} {hi}->{lo} per class ({rows} rows)' for n, (hi, lo, rows) in shape.items())}; "
          f"balanced validation; {SEEDS} seeds, {EPOCHS} epochs; mean +- 95 % interval over seeds")
    keys = list(next(iter(results.values()))[0])
    for key in keys:
        print(f"\n{key}")
        base = results["ce"]
        for name, runs in results.items():
            mean, half = interval([r[key] for r in runs])
            diff = ""
            if name != "ce":
                d_mean, d_half = interval([a[key] - b[key] for a, b in zip(runs, base, strict=True)])
                diff = f"   vs ce {d_mean:+.4f} +- {d_half:.4f}"
            print(f"  {name:<28} {mean:9.4f} +- {half:.4f}{diff}")


if __name__ == "__main__":
    main()
