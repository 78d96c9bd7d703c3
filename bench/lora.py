"""LoRA vs full fine-tuning on the demo (tiny model, CPU), same data, steps and seed.

For each variant: trainable parameters, best-model folder size, one checkpoint's size, training
images/s (the loop's own figure, mean over the logging windows), and the final full evaluation's
accuracy. LoRA runs at several learning rates (it usually wants a higher one than full fine-tuning).

  .venv/bin/python bench/lora.py                   # after `make setup`
  LRS=2e-3,5e-3,1e-2 EPOCHS=6 .venv/bin/python bench/lora.py
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LRS = [float(x) for x in os.environ.get("LRS", "2e-3,5e-3,1e-2").split(",")]
EPOCHS = int(os.environ.get("EPOCHS", "6"))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(params: dict, out: Path) -> dict:
    from food_multids.pipelines import node_sections
    from food_multids.pipelines.data.nodes import run_data_nodes
    from food_multids.pipelines.full_eval.nodes import full_evaluate
    from food_multids.pipelines.train.nodes import train_deepspeed

    params = copy.deepcopy(params)
    params["training"].update(output_dir=str(out), progress_bar="never", num_train_epochs=EPOCHS)
    train_set, _, subset, full = run_data_nodes(params)
    history, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))
    best = Path(manifest["best"]["path"])
    metrics, _, _ = full_evaluate(best, full, **node_sections(full_evaluate, params))
    info = json.loads((best / "training_info.json").read_text())
    speeds = [r["metrics"]["images_per_second"] for r in history["records"]
              if r["kind"] == "train" and "images_per_second" in r["metrics"]]
    checkpoint = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step-"))[-1]
    return {"trainable": info["trainable_parameters"], "total": info["total_parameters"], "best_mb": folder_mb(best),
            "checkpoint_mb": folder_mb(checkpoint), "img_s": sum(speeds) / len(speeds),
            "accuracy": metrics["overall_accuracy"], "digits": metrics["digits_accuracy"],
            "shapes": metrics["shapes_accuracy"], "steps": manifest["final_step"]}


def main() -> None:
    base = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    for section in ("data",):
        base[section]["train_jsonl_list"] = [str(ROOT / p) for p in base[section]["train_jsonl_list"]]
        base[section]["val_jsonl_list"] = [str(ROOT / p) for p in base[section]["val_jsonl_list"]]
    base["model"]["name_or_path"] = str(ROOT / base["model"]["name_or_path"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("full", base["training"]["learning_rate"], run(base, Path(tmp) / "full")))
        for lr in LRS:
            params = copy.deepcopy(base)
            params["model"]["finetuning"] = "lora"
            params["training"]["learning_rate"] = lr
            rows.append(("lora", lr, run(params, Path(tmp) / f"lora_{lr}")))
    print(f"demo, {EPOCHS} epochs ({rows[0][2]['steps']} steps), tiny model, CPU; LoRA: conf/base model.lora "
          f"(r {base['model']['lora']['r']}, parts {base['model']['lora']['parts']})")
    print("| mode | lr | trainable / total parameters | best-model folder | checkpoint | train img/s | "
          "overall / digits / shapes accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, lr, r in rows:
        print(f"| {mode} | {lr:g} | {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
              f"{r['best_mb']:.2f} MB | {r['checkpoint_mb']:.2f} MB | {r['img_s']:.0f} | "
              f"{r['accuracy']:.4f} / {r['digits']:.4f} / {r['shapes']:.4f} |")


if __name__ == "__main__":
    main()
