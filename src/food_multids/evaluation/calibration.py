"""Calibrated confidence and "none of these" (temperature scaling, Guo et al. 2017).

A seeded share of each dataset's validation images (evaluation.calibration_fraction, chosen by a hash of
the image's sample_id and training.seed, so the same images every time) fits one temperature per
dataset: the one minimising their mean NLL. The rest, never used for fitting, measure the calibration
(expected calibration error over 15 equal-width bins, and NLL, before and after) and the selective
accuracy (rank by calibrated confidence, keep the top share). The accuracy metrics use every image:
a temperature never changes which class wins.

The fit needs no logit rows on the host: one pass scores every image at a grid of temperatures
(inference's `temperature_grid`), then a parabola through the grid's best point and its neighbours
(in log T) refines the minimum.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

GRID = np.unique(np.append(np.geomspace(0.05, 20.0, 61), 1.0))  # about 10 % apart, 1.0 exactly
BINS = 15
COVERAGE = 0.8  # the selective accuracy reported: the most confident 80 % of the images


def calibration_rows(sample_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for the images that fit the temperatures: a hash of (sample_id, seed) below `fraction`."""
    with np.errstate(over="ignore"):
        z = np.asarray(sample_ids, dtype=np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def best_temperature(mean_nll: np.ndarray, grid: np.ndarray = GRID) -> float:
    """The grid temperature with the lowest mean NLL, refined by a parabola in log T through it and its
    two neighbours (kept inside them)."""
    i = int(np.nanargmin(mean_nll))
    if i == 0 or i == len(grid) - 1:
        return float(grid[i])
    x, y = np.log(grid[i - 1:i + 2]), mean_nll[i - 1:i + 2]
    denominator = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / denominator
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / denominator
    if a <= 0:
        return float(grid[i])
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share of images."""
    if not len(confidence):
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per non-empty bin: its mean confidence, accuracy and image count (the report's reliability diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean()),
             "count": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def selective(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coverage and accuracy when keeping the k most confident images, k = 1..N, and the area under the
    risk-coverage curve (mean of 1 - accuracy over k; lower is better)."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    kept = np.arange(1, len(order) + 1)
    accuracy = hits / kept
    return kept / len(order), accuracy, float(np.mean(1.0 - accuracy)) if len(order) else float("nan")


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float:
    """The lowest confidence threshold whose kept images (confidence >= it) are at least `precision` accurate;
    1.0 (reject nearly everything) when no threshold reaches it."""
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    reaching = np.flatnonzero(accuracy >= precision)
    if not len(reaching):
        return 1.0
    return float(confidence[order][reaching[-1]])


def fit(preds: pd.DataFrame, names: list[str], seed: int, fraction: float, precision: float) -> dict:
    """Temperatures and auto thresholds per dataset from a full pass scored at GRID (columns grid_nll,
    grid_conf, dataset_id, sample_id, label, prediction)."""
    fitting = calibration_rows(preds["sample_id"].to_numpy(), seed, fraction)
    nll = np.array(preds["grid_nll"].tolist(), dtype=np.float64).reshape(len(preds), -1)
    conf = np.array(preds["grid_conf"].tolist(), dtype=np.float64).reshape(len(preds), -1)
    correct = (preds["prediction"].to_numpy() == preds["label"].to_numpy()).astype(np.float64)
    temperature, threshold, fitted_on = {}, {}, {}
    for i, name in enumerate(names):
        rows = fitting & (preds["dataset_id"].to_numpy() == i)
        fitted_on[name] = int(rows.sum())
        if rows.sum() < 2:
            logger.warning("Calibration of %s: %d image(s) in its calibration split, temperature left at 1",
                           name, int(rows.sum()))
            temperature[name], threshold[name] = 1.0, None
            continue
        temperature[name] = best_temperature(nll[rows].mean(axis=0))
        nearest = int(np.argmin(np.abs(np.log(GRID) - np.log(temperature[name]))))
        threshold[name] = threshold_for_precision(conf[rows, nearest], correct[rows], precision)
    return {"temperature": temperature, "auto_reject_below": threshold, "reject_precision": precision,
            "fraction": fraction, "seed": seed, "fitted_on": fitted_on, "method": "temperature scaling, NLL"}


def write_calibration(model_dir: Path, calibration: dict) -> None:
    """Store the fit in the model folder's classifier.json (atomically: a crash leaves the old file)."""
    import json

    from food_multids.model.classifier import CLASSIFIER_FILE, ClassifierMeta
    from food_multids.runtime.files import write_json_atomic

    path = Path(model_dir) / CLASSIFIER_FILE
    meta = ClassifierMeta.from_json(path.read_text())
    meta.calibration = calibration
    write_json_atomic(path, json.loads(meta.to_json()))


def held_out_metrics(preds: pd.DataFrame, names: list[str], calibration: dict) -> tuple[dict[str, float], dict]:
    """On the images the fit did not use, per dataset: ECE and NLL before (T = 1) and after (the fitted T),
    AURC and the selective accuracy at 80 % coverage with the calibrated confidence. `preds` was scored
    at [1, T_dataset] (grid columns 0 and 1). Returns the metrics and the report's curves."""
    held = ~calibration_rows(preds["sample_id"].to_numpy(), int(calibration["seed"]), float(calibration["fraction"]))
    nll = np.array(preds["grid_nll"].tolist(), dtype=np.float64).reshape(len(preds), -1)
    conf = np.array(preds["grid_conf"].tolist(), dtype=np.float64).reshape(len(preds), -1)
    correct = (preds["prediction"].to_numpy() == preds["label"].to_numpy()).astype(np.float64)
    metrics: dict[str, float] = {}
    curves: dict[str, dict] = {}
    for i, name in enumerate(names):
        rows = held & (preds["dataset_id"].to_numpy() == i)
        if not rows.any():
            continue
        coverage, accuracy, aurc = selective(conf[rows, 1], correct[rows])
        at = min(len(coverage) - 1, max(0, int(np.ceil(COVERAGE * len(coverage))) - 1))
        metrics.update({
            f"{name}_ece": expected_calibration_error(conf[rows, 0], correct[rows]),
            f"{name}_ece_calibrated": expected_calibration_error(conf[rows, 1], correct[rows]),
            f"{name}_nll": float(nll[rows, 0].mean()), f"{name}_nll_calibrated": float(nll[rows, 1].mean()),
            f"{name}_aurc": aurc, f"{name}_selective_accuracy_at_80": float(accuracy[at]),
            f"{name}_temperature": float(calibration["temperature"].get(name, 1.0)),
            f"{name}_calibration_held_out_images": float(rows.sum())})
        step = max(1, len(coverage) // 100)  # at most ~100 points per curve in the report
        curves[name] = {"reliability_before": reliability(conf[rows, 0], correct[rows]),
                        "reliability_after": reliability(conf[rows, 1], correct[rows]),
                        "coverage": coverage[::step].tolist() + [1.0], "accuracy": accuracy[::step].tolist()
                        + [float(accuracy[-1])]}
    return metrics, curves


def calibrate_model(cfg, model_dir: Path, frame: pd.DataFrame) -> dict:
    """Fit the temperatures of a saved classifier on its calibration split of `frame` (the full validation
    set) and store them in its classifier.json (one pass over that split, in this process on one device:
    a share of the validation set, where the full evaluation shards all of it). Returns the fit."""
    from food_multids.inference.model import load_model, run_model
    from food_multids.runtime.device import resolve_device

    names = list(cfg.dataset_names)
    # Only the calibration split is scored: the rest is the full evaluation's to measure.
    fitting = frame[calibration_rows(frame["sample_id"].to_numpy(), cfg.training.seed,
                                     cfg.evaluation.calibration_fraction)]
    loaded = load_model(Path(model_dir), resolve_device(cfg), cfg.model)
    out = run_model(loaded, fitting, batch_size=cfg.evaluation.batch_size or cfg.training.per_device_eval_batch_size,
                    top_k=1, desc="calibration", progress_mode=cfg.training.progress_bar,
                    max_consecutive_bad_images=cfg.training.max_consecutive_bad_images,
                    temperature_grid=np.tile(GRID, (len(names), 1)))
    preds = pd.DataFrame({key: out.predictions[key] for key in
                          ("sample_id", "dataset_id", "label", "prediction", "grid_nll", "grid_conf")})
    device = loaded.device
    del loaded, out
    if device.type == "cuda":  # the Kedro process: give the GPU back to the next step's ranks
        import torch

        torch.cuda.empty_cache()
    fitted = fit(preds, names, cfg.training.seed, cfg.evaluation.calibration_fraction, cfg.evaluation.reject_precision)
    write_calibration(Path(model_dir), fitted)
    logger.info("Calibrated %s: temperature %s (fitted on %s validation images, evaluation.calibration_fraction %g)",
                Path(model_dir).name, {n: round(t, 3) for n, t in fitted["temperature"].items()},
                fitted["fitted_on"], cfg.evaluation.calibration_fraction)
    return fitted
