"""Train-node overhead: the project's train_deepspeed node run through a Kedro session vs a bare
DeepSpeed loop over the same tiny model, data, batch size and number of steps, in the same process.

    .venv/bin/python bench/train_overhead.py [--steps 120] [--repeats 2]

Both sides load the model from the same directory, build the same batches (same collator), run
`--steps` optimizer steps with ZeRO-2 on DeepSpeed's CPU accelerator, then one evaluation pass over
the eval subset and one checkpoint. Prints wall time, images/s, peak RSS and the ratio (target <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kedro_node(steps: int, batch: int) -> float:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    extra = {"training": {"max_steps": steps, "per_device_train_batch_size": batch, "logging_steps": 10,
                          "eval_steps": steps, "save_steps": steps, "output_dir": "data/06_models/bench_overhead",
                          "progress_bar": "never"}}
    with KedroSession.create(project_path=ROOT, runtime_params=extra) as session:
        start = time.perf_counter()
        session.run(pipeline_names=["train"], node_names=["train_deepspeed"])
        elapsed = time.perf_counter() - start
    import mlflow

    while mlflow.active_run():  # several sessions in one process: close what the previous one left open
        mlflow.end_run()
    return elapsed


def bare_loop(steps: int, batch: int) -> float:
    import deepspeed
    import pandas as pd
    import yaml

    from food_multids.data.collator import ClassificationCollator, ImageEncoder, PromptTokens
    from food_multids.data.dataset import RecordDataset
    from food_multids.model.classifier import ClassifierMeta, create_classifier, mask_logits
    from food_multids.model.loading import load_tokenizer

    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    model_dir = ROOT / params["model"]["name_or_path"]
    latest = lambda name: sorted((ROOT / name).iterdir())[-1] / Path(name).name  # noqa: E731
    train = pd.read_parquet(latest("data/03_primary/train_set.parquet"))
    subset = pd.read_parquet(latest("data/05_model_input/eval_subset.parquet"))
    start = time.perf_counter()
    torch.manual_seed(0)
    meta = ClassifierMeta(num_labels=params["model"]["num_labels"], pooling=params["model"]["pooling"])
    model = create_classifier(model_dir, meta, "float32", torch.device("cpu"))
    encoder = ImageEncoder.from_pretrained(model_dir, params["model"]["min_pixels"], params["model"]["max_pixels"])
    collate = ClassificationCollator(PromptTokens.from_tokenizer(load_tokenizer(model_dir), params["model"]["prompt"]))
    loader = DataLoader(RecordDataset(train, encoder), batch_size=batch, shuffle=True, collate_fn=collate,
                        drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    done = 0
    while done < steps:
        for b in loader:
            logits = engine(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                            b["num_classes"])
            engine.backward(F.cross_entropy(logits, b["labels"]))
            engine.step()
            done += 1
            if done == steps:
                break
    engine.eval()
    with torch.no_grad():
        for b in DataLoader(RecordDataset(subset, encoder), batch_size=64, collate_fn=collate):
            mask_logits(engine(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]),
                        b["num_classes"])
    engine.save_checkpoint(str(ROOT / "data/06_models/bench_overhead_bare"), tag="final")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("FOOD_MULTIDS_PROGRESS", "never")
    os.chdir(ROOT)
    kedro_node(5, args.batch)  # warm-up: DeepSpeed's CPU op build, imports, MLflow tables
    node_s, bare_s = [], []
    for _ in range(args.repeats):
        node_s.append(kedro_node(args.steps, args.batch))
        bare_s.append(bare_loop(args.steps, args.batch))
    images = args.steps * args.batch
    node, bare = min(node_s), min(bare_s)
    print(f"train node via Kedro : {node:6.2f} s  {images / node:7.1f} img/s  (runs: "
          f"{', '.join(f'{s:.2f}' for s in node_s)})")
    print(f"bare DeepSpeed loop  : {bare:6.2f} s  {images / bare:7.1f} img/s  (runs: "
          f"{', '.join(f'{s:.2f}' for s in bare_s)})")
    print(f"ratio node / bare    : {node / bare:.3f}  (target <= 1.05)   peak RSS {peak_rss_mib():.0f} MiB (both, "
          "same process)")


if __name__ == "__main__":
    main()
