"""Ingest benchmark: the three data nodes on a generated 1,000,000-row, two-dataset JSONL.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--check-rows 100000]

Prints rows/s for ingest_jsonl -> merge_and_tag -> split_eval_subsets without the image check (1M
rows), with the image check (on --check-rows rows pointing at real, distinct image files), and a
stdlib json.loads loop over the same 1M-row files in the same run. Target: the three nodes on 1M
rows in at most 1 s without file checks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from food_multids.pipelines.data.nodes import run_data_nodes

DATASETS = {"food101": 101, "food2k": 2000}


def write_files(root: Path, rows: int, image_of) -> dict:
    rng = np.random.default_rng(0)
    files = {"train": [], "val": []}
    for split, n_split in (("train", rows), ("val", rows // 10)):
        for d, (name, n_classes) in enumerate(DATASETS.items()):
            n = n_split // 2
            labels = rng.integers(0, n_classes, n)
            path = root / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as fh:
                fh.writelines(f'{{"image": "{image_of(split, d, i)}", "label": {int(lab)}, "dataset_name": "{name}"}}\n'
                              for i, lab in enumerate(labels))
            files[split].append(str(path))
    return files


def params_for(files: dict, check: bool) -> dict:
    return {"model": {"num_labels": 2000},
            "data": {"train_jsonl_list": files["train"], "val_jsonl_list": files["val"], "check_images": check},
            "datasets": {"dataset_configs": {"food101": {"num_classes": 101, "eval_ratio": 0.2},
                                             "food2k": {"num_classes": 2000, "eval_ratio": 0.1}}}}


def time_nodes(params: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    train_set, val_set, _, _ = run_data_nodes(params)  # ingest_jsonl -> merge_and_tag -> split_eval_subsets
    return time.perf_counter() - t0, len(train_set) + len(val_set)


def stdlib_loop(files: dict) -> float:
    t0 = time.perf_counter()
    for path in files["train"] + files["val"]:
        with open(path) as fh:
            for line in fh:
                json.loads(line)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--check-rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_files(root / "nocheck", args.rows, lambda s, d, i: f"images/{s}/{d}_{i}.jpg")
        time_nodes(params_for(files, False))  # warm imports and caches
        runs = [time_nodes(params_for(files, False)) for _ in range(3)]
        nodes_s, n = min(runs)
        loop_s = stdlib_loop(files)
        print(f"nodes, no image check : {n:,} rows in {nodes_s:.3f} s = {n / nodes_s:,.0f} rows/s (best of 3)")
        print(f"stdlib json.loads loop: {n:,} rows in {loop_s:.3f} s = {n / loop_s:,.0f} rows/s")
        print(f"ratio nodes / stdlib loop: {nodes_s / loop_s:.2f}  (target: nodes <= 1.0 s on 1M rows: "
              f"{'met' if nodes_s <= 1.0 else 'NOT met'})")

        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (56, 56), (10, 20, 30)).save(buf, format="PNG")
        png = buf.getvalue()
        check_root = root / "check"

        def image_of(split, d, i):
            path = check_root / "images" / split / f"{d}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            return str(path)

        files = write_files(check_root, args.check_rows, image_of)
        check_s, n = time_nodes(params_for(files, True))
        print(f"nodes, image check on : {n:,} rows in {check_s:.3f} s = {n / check_s:,.0f} rows/s")


if __name__ == "__main__":
    main()
