"""`food-multids predict MODEL INPUT...`: a quick look at what a trained model sees in some images.

MODEL: a model folder, `best` (the newest best_model version in the catalog; `best:<version>` for
another) or an MLflow model URI (models:/food_multids/3, runs:/<run id>/model). INPUT: image files,
folders (every image below them) and JSONL record files, mixed freely.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import click

from food_multids.config.paths import find_project_root, resolve_path

BEST_MODEL = Path("data/06_models/best_model")


def add_parser(sub) -> None:
    cmd = sub.add_parser("predict", help="predict the classes of images with a trained model", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("model", help="a model folder, best[:<version>], or an MLflow URI (models:/food_multids/1)")
    cmd.add_argument("inputs", nargs="+", type=Path, help="image files, folders of images, JSONL record files")
    cmd.add_argument("--dataset", default=None,
                     help="label space for images and rows without dataset_name (default: each space the model knows)")
    cmd.add_argument("--top-k", type=_positive, default=5)
    cmd.add_argument("--batch-size", type=_positive, default=8)
    cmd.add_argument("--max-image-pixels", type=_positive, default=64_000_000,
                     help="refuse larger images before decoding them (default 64 M)")
    cmd.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cmd.add_argument("--skip-bad", action="store_true", help="skip unreadable rows and images instead of stopping")
    cmd.add_argument("--json", action="store_true", help="one JSON object per prediction on stdout")
    cmd.add_argument("--uncalibrated", action="store_true",
                     help="raw softmax probabilities instead of the model's temperature-scaled ones")
    cmd.add_argument("--reject-below", default=None, type=_reject,
                     help="a confidence in [0, 1], or auto (the model's fitted threshold): below it the prediction "
                          "is -1 / unknown ('none of these'), the top-k still listed")


def _reject(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or auto, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or auto, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_model(spec: str, root: Path) -> Path:
    """best / best:<version> / a folder / an MLflow URI -> a local classifier folder."""
    if spec == "best" or spec.startswith("best:"):
        versions = root / BEST_MODEL
        wanted = spec.partition(":")[2]
        found = sorted(p.name for p in versions.iterdir() if (p / "best_model" / "config.json").is_file()) \
            if versions.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no best_model version under {versions}: train one with "
                                    "`kedro run --pipelines train`")
        if wanted and wanted not in found:
            raise FileNotFoundError(f"best_model has no version {wanted!r}; the versions are: {', '.join(found)}")
        return versions / (wanted or found[-1]) / "best_model"
    if spec.startswith(("models:/", "runs:/")):
        from food_multids.framework.hooks import check_sqlite_store, sqlite_path

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            import mlflow

            uri = f"sqlite:///{root / 'mlflow.db'}"  # the project's store (conf/base/mlflow.yml)
            mlflow.set_tracking_uri(uri)
        store = sqlite_path(uri)
        if store is not None:  # a damaged store: one line naming the file, not sqlalchemy's traceback
            check_sqlite_store(store)
    from food_multids.inference.source import local_model_dir

    return local_model_dir(spec)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from food_multids.data.records import RecordError
    from food_multids.inference.inputs import IMAGE_SUFFIXES, list_images, records_from_files
    from food_multids.inference.model import load_model
    from food_multids.inference.predict import predict_records
    from food_multids.runtime.device import resolve_device_name

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    hf_logging.disable_progress_bar()  # "Loading weights" for a tiny model is noise here
    root = find_project_root()
    try:
        model_dir = resolve_model(args.model, root)
        jsonl, images = [], []
        for item in (resolve_path(p, Path.cwd()) for p in args.inputs):
            if item.is_dir():
                images += list_images(item)
            elif item.suffix.lower() in (".jsonl", ".json"):
                jsonl.append(item)
            elif item.suffix.lower() in IMAGE_SUFFIXES or item.is_file():
                images.append(item)
            else:
                raise FileNotFoundError(f"{item}: no such file or folder")
        loaded = load_model(model_dir, resolve_device_name(args.device, "--device"))
        records, rejected = records_from_files(jsonl, images, args.dataset, loaded.label_spaces,
                                               on_bad_rows="skip" if args.skip_bad else "error",
                                               max_image_pixels=args.max_image_pixels, bad_rows_setting="--skip-bad",
                                               pixels_setting="--max-image-pixels")
    except (FileNotFoundError, RecordError, ValueError) as exc:
        _err(f"food-multids predict: {exc}")
        return 2
    except click.ClickException as exc:  # a damaged MLflow store (hooks.MlflowStoreError)
        _err(f"food-multids predict: {exc.format_message()}")
        return 2
    for r in rejected.itertuples():
        _err(f"skipped {r.file}:{r.line}: {r.reason}: {r.detail}")
    try:
        table = predict_records(loaded, records, top_k=args.top_k, batch_size=args.batch_size,
                                calibrated=not args.uncalibrated, reject_below=args.reject_below)
    except ValueError as exc:  # --reject-below auto on a model without fitted thresholds
        _err(f"food-multids predict: {exc}")
        return 2
    if args.json:
        for row in table.to_dict(orient="records"):
            _out(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}))
    else:
        _out(format_table(table))
    return 0


def format_table(table) -> str:
    """image, dataset, then `name (probability)` for each of the top classes."""
    lines = []
    width = min(60, max((len(str(i)) for i in table["image"]), default=5))
    for row in table.itertuples():
        image = str(row.image)
        image = image if len(image) <= width else "..." + image[-(width - 3):]
        if isinstance(row.error, str) and row.error:  # a missing error reads back from pandas as NaN
            ranked = f"ERROR: {row.error}"
        else:
            ranked = ", ".join(f"{name if name is not None else cid} ({p:.3f})"
                               for cid, name, p in zip(row.top_k_ids, row.top_k_names, row.top_k_probs, strict=True))
            if row.prediction == -1:  # below --reject-below: none of these; the top-k for a look
                ranked = f"unknown (below --reject-below; top: {ranked})"
        lines.append(f"{image:<{width}}  {row.dataset_name:<12}  {ranked}")
    return "\n".join(lines)
