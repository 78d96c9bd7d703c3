"""Pure metric functions: arrays in, dict[str, float] out. No torch.

Partial evaluation scores a stratified sample of each dataset's validation set (eval_ratio of it), so its
numbers are estimates of the full validation set's, with sampling error:
- `stratified_summary`: the overall estimate weights each dataset by its share of the full validation set
  (W_h = N_h / N), not by its share of the subset, which differs whenever eval ratios differ; per dataset a
  Wilson interval and for the overall value the stratified variance, both with the finite-population
  correction (a dataset scored whole contributes no sampling error).
- `stratified_mean_se` and `choose_best`: a checkpoint replaces the best only when its gain is more than
  noise (the paired rule compares both models on the same images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np


def summarize(loss_sum: Sequence[float], correct: Sequence[float], count: Sequence[float],
              names: Sequence[str]) -> dict[str, float]:
    """Per-dataset and overall loss, accuracy and samples from per-dataset sums.

    Overall values are over all samples (sums of sums), not the mean of the datasets. A dataset with
    no samples in the window is left out rather than reported as 0.
    """
    loss_sum, correct, count = (np.asarray(a, dtype=np.float64) for a in (loss_sum, correct, count))
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        if count[i] > 0:
            out[f"{name}_loss"] = loss_sum[i] / count[i]
            out[f"{name}_accuracy"] = correct[i] / count[i]
            out[f"{name}_samples"] = float(count[i])
    total = count.sum()
    if total > 0:
        out["overall_loss"] = loss_sum.sum() / total
        out["overall_accuracy"] = correct.sum() / total
        out["overall_samples"] = float(total)
    return out


def z_for(confidence: float) -> float:
    """Two-sided normal quantile: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: float, count: float, z: float, sampled_fraction: float = 0.0) -> tuple[float, float]:
    """Wilson score interval of a proportion (good coverage near 0 and 1, unlike p +- z SE).

    `sampled_fraction` = n / N when the n scored rows are a sample without replacement of N: the
    effective size n / (1 - n/N) applies the finite-population correction, so a set scored whole (1.0)
    has a zero-width interval. The interval always contains correct / count.
    """
    if count <= 0:
        return math.nan, math.nan
    p = correct / count
    if sampled_fraction >= 1:
        return p, p
    n = count / (1 - sampled_fraction)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def stratum_weights(count: np.ndarray, population: np.ndarray | None, proportional: bool) -> np.ndarray:
    """W_h: each evaluated dataset's share of the full validation set (N_h / N). `proportional` (every
    dataset sampled at the same eval_ratio) or no population: its share of the evaluated rows (n_h / n),
    which is then the same estimate without the rounding of n_h, so today's pooled value exactly."""
    present = count > 0
    base = count if proportional or population is None else np.asarray(population, dtype=np.float64)
    weights = np.where(present, base, 0.0).astype(np.float64)
    total = weights.sum()
    return weights / total if total > 0 else weights


def sampled_fractions(count: np.ndarray, population: np.ndarray | None) -> np.ndarray:
    """f_h = n_h / N_h (0 when the population is unknown: no finite-population correction)."""
    if population is None:
        return np.zeros(len(count))
    population = np.asarray(population, dtype=np.float64)
    return np.clip(np.divide(count, population, out=np.zeros(len(count)), where=population > 0), 0.0, 1.0)


def stratified_summary(loss_sum: Sequence[float], correct: Sequence[float], count: Sequence[float],
                       names: Sequence[str], population: Sequence[float] | None = None, confidence: float = 0.95,
                       proportional: bool = False) -> dict[str, float]:
    """`summarize` of a partial evaluation, with the overall values estimating the full validation set.

    `population`: N_h, each dataset's full validation size (None: unknown, the subset is the population
    sample as is). Adds `<ds>_accuracy_ci_low/_high` (Wilson), `overall_accuracy_pooled` (the subset's
    own Σcorrect/Σcount) and `overall_accuracy_ci_low/_high`: p ± z·sqrt(Σ W_h² (1 - f_h) p̃_h(1 - p̃_h) /
    (n_h - 1)), with p̃_h the Agresti-Coull adjusted accuracy so a dataset at 0 or 1 still has width.
    """
    loss_sum, correct, count = (np.asarray(a, dtype=np.float64) for a in (loss_sum, correct, count))
    pop = None if population is None else np.asarray(population, dtype=np.float64)
    out = summarize(loss_sum, correct, count, names)
    z = z_for(confidence)
    fractions = sampled_fractions(count, pop)
    for i, name in enumerate(names):
        if count[i] > 0:
            low, high = wilson_interval(correct[i], count[i], z, fractions[i])
            out[f"{name}_accuracy_ci_low"], out[f"{name}_accuracy_ci_high"] = low, high
    if count.sum() <= 0:
        return out
    present = count > 0
    weights = stratum_weights(count, pop, proportional)
    out["overall_accuracy_pooled"] = out["overall_accuracy"]
    if not proportional and pop is not None:
        out["overall_accuracy"] = float(np.sum(weights[present] * correct[present] / count[present]))
        out["overall_loss"] = float(np.sum(weights[present] * loss_sum[present] / count[present]))
    adjusted = (correct[present] + z * z / 2) / (count[present] + z * z)
    variance = np.sum(weights[present] ** 2 * (1 - fractions[present]) * adjusted * (1 - adjusted)
                      / np.maximum(count[present] - 1, 1))
    half = z * math.sqrt(variance)
    out["overall_accuracy_ci_low"] = max(0.0, out["overall_accuracy"] - half)
    out["overall_accuracy_ci_high"] = min(1.0, out["overall_accuracy"] + half)
    return out


def full_set_intervals(correct: Sequence[float], count: Sequence[float], names: Sequence[str],
                       confidence: float = 0.95) -> dict[str, float]:
    """Wilson intervals of the accuracy in the population the full validation set was drawn from (no
    finite-population correction: the set itself is a sample of what the model will meet)."""
    correct, count = np.asarray(correct, dtype=np.float64), np.asarray(count, dtype=np.float64)
    z = z_for(confidence)
    out: dict[str, float] = {}
    for i, name in enumerate([*names, "overall"]):
        c, n = (correct.sum(), count.sum()) if name == "overall" else (correct[i], count[i])
        if n > 0:
            out[f"{name}_accuracy_ci_low"], out[f"{name}_accuracy_ci_high"] = wilson_interval(c, n, z)
    return out


def stratified_mean_se(values: np.ndarray, strata: np.ndarray, weights: np.ndarray, fractions: np.ndarray
                       ) -> tuple[float, float]:
    """Σ_h W_h mean_h(values) and its standard error sqrt(Σ W_h² (1 - f_h) s_h² / n_h) (s_h² with ddof 1).
    `weights` and `fractions` are indexed by stratum; strata without rows are left out (weights renormalised)."""
    values, strata = np.asarray(values, dtype=np.float64), np.asarray(strata, dtype=np.int64)
    size = len(weights)
    n = np.bincount(strata, minlength=size).astype(np.float64)
    sums = np.bincount(strata, weights=values, minlength=size)
    present = n > 0
    if not present.any():
        return math.nan, math.nan
    w = np.where(present, weights, 0.0)
    w = w / w.sum() if w.sum() > 0 else present / present.sum()
    means = np.divide(sums, n, out=np.zeros(size), where=present)
    squares = np.bincount(strata, weights=(values - means[strata]) ** 2, minlength=size)
    var = np.divide(squares, n - 1, out=np.zeros(size), where=n > 1)
    se2 = np.sum(np.divide(w ** 2 * (1 - fractions) * var, n, out=np.zeros(size), where=present))
    return float(np.sum(w * means)), math.sqrt(se2)


Rule = Literal["point", "paired", "lower_bound"]


def choose_best(rule: Rule, greater_is_better: bool, value: float, best: dict | None, *, z: float = 1.0,
                paired: tuple[float, float] | None = None, bound: float | None = None,
                paired_images: int | None = None) -> tuple[bool, str]:
    """Does this evaluation replace `best` ({"value", "step", "bound"})? Returns (improved, reason).

    point: strictly better point estimate (the seed trainer's rule). paired: the gain, measured on the
    same images as the best model (`paired` = (candidate - best, its standard error)), exceeds z standard
    errors (z = 1: the one-standard-error rule); with no sampling error (every image scored) any gain
    counts. lower_bound: the pessimistic end of the confidence interval (`bound`: lower for accuracies,
    upper for losses) is better than the best's.
    """
    if best is None:
        return True, "first evaluation"
    sign = 1.0 if greater_is_better else -1.0
    if rule == "paired" and paired is not None and all(math.isfinite(v) for v in paired):
        diff, se = paired
        gain = sign * diff
        improved = bool(gain > z * se if se > 0 else gain > 0)
        verdict = "more" if improved else "not more"
        images = f"{paired_images} images" if paired_images is not None else "images"
        return improved, (f"paired: {gain:+.4f} over step {best['step']} on the same {images}, {verdict} than "
                          f"{z:g} x SE {se:.4f}")
    if rule == "lower_bound" and bound is not None and best.get("bound") is not None:
        improved = bool(sign * bound > sign * best["bound"])
        end = "lower" if greater_is_better else "upper"
        return improved, (f"lower_bound: {end} confidence bound {bound:.4f} {'beats' if improved else 'does not beat'} "
                          f"{best['bound']:.4f} of step {best['step']}")
    improved = bool(is_improvement(value, best["value"], greater_is_better))  # a plain bool: it goes to JSON
    fallback = "" if rule == "point" else f" ({rule} has no per-image values for this metric)"
    return improved, (f"point{fallback}: {value:.4f} {'beats' if improved else 'does not beat'} {best['value']:.4f} "
                      f"of step {best['step']}")


def is_improvement(value: float, best: float | None, greater_is_better: bool) -> bool:
    """Strictly better than the best so far (ties keep the earlier model)."""
    if best is None:
        return True
    return value > best if greater_is_better else value < best


def topk_accuracy(labels: np.ndarray, topk: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the first k columns of `topk` (rows sorted best first)."""
    if len(labels) == 0:
        return float("nan")
    return float((topk[:, :k] == labels[:, None]).any(axis=1).mean())


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (scikit-learn's default)."""
    if len(labels) == 0:
        return float("nan")
    classes = np.union1d(labels, preds)
    size = int(max(classes.max() + 1, num_classes or 0))
    tp = np.bincount(labels[labels == preds], minlength=size).astype(np.float64)
    pred_count = np.bincount(preds, minlength=size).astype(np.float64)
    true_count = np.bincount(labels, minlength=size).astype(np.float64)
    denom = pred_count + true_count
    f1 = np.divide(2 * tp, denom, out=np.zeros(size), where=denom > 0)
    return float(f1[classes].mean())


def format_train_line(metrics: dict[str, float], names: Sequence[str], step: int, total: int) -> str:
    """One line per logging step (training.log_format: compact): each dataset's loss and accuracy, the
    overall accuracy, learning rate, speed and the batch mix of the window."""
    parts = [f"📊 TRAIN step {step}/{total}"]
    for name in names:
        if f"{name}_samples" in metrics:
            parts.append(f"{name} loss {metrics[f'{name}_loss']:.4f} acc {metrics[f'{name}_accuracy']:.2%}")
    if "overall_samples" in metrics:
        parts.append(f"OVERALL acc {metrics['overall_accuracy']:.2%}")
    parts.append(f"lr {metrics['learning_rate']:.3g}")
    parts.append(f"{metrics['images_per_second']:.1f} img/s")
    shares = [f"{name} {metrics[f'{name}_share']:.2f}" for name in names if f"{name}_share" in metrics]
    if shares:
        parts.append("mix " + " ".join(shares))
    return " · ".join(parts)


def format_train_lines(metrics: dict[str, float], names: Sequence[str]) -> list[str]:
    """The seed trainer's per-dataset training lines."""
    lines = []
    for name in names:
        if f"{name}_samples" in metrics:
            acc = metrics[f"{name}_accuracy"]
            lines.append(f"📊 TRAIN - {name}: Loss={metrics[f'{name}_loss']:.4f}, Acc={acc:.4f} ({acc:.2%}), "
                         f"Samples={int(metrics[f'{name}_samples'])}")
    if "overall_samples" in metrics:
        acc = metrics["overall_accuracy"]
        lines.append(f"📊 TRAIN - OVERALL: Acc={acc:.4f} ({acc:.2%}), Samples={int(metrics['overall_samples'])}")
    return lines


def format_eval_lines(metrics: dict[str, float], names: Sequence[str]) -> list[str]:
    """The seed trainer's evaluation lines."""
    lines = []
    for name in names:
        if f"{name}_samples" in metrics:
            acc = metrics[f"{name}_accuracy"]
            lines.append(f"📂 {name}:   Loss: {metrics[f'{name}_loss']:.4f}, Accuracy: {acc:.4f} "
                         f"({acc:.2%}){_plus_minus(metrics, name)}, Samples: {int(metrics[f'{name}_samples']):,}")
    if "overall_samples" in metrics:
        acc = metrics["overall_accuracy"]
        pooled = metrics.get("overall_accuracy_pooled")
        note = f" (pooled over the subset: {pooled:.4f})" if pooled is not None and abs(pooled - acc) > 5e-5 else ""
        lines.append(f"📈 Overall:   Loss: {metrics['overall_loss']:.4f}, Accuracy: {acc:.4f} "
                     f"({acc:.2%}){_plus_minus(metrics, 'overall')}, Samples: "
                     f"{int(metrics['overall_samples']):,}{note}")
    return lines


def _plus_minus(metrics: dict[str, float], name: str) -> str:
    """' ± 1.6' (half the confidence interval's width, in accuracy points) when the interval is known."""
    low, high = metrics.get(f"{name}_accuracy_ci_low"), metrics.get(f"{name}_accuracy_ci_high")
    return "" if low is None or high is None else f" ± {50 * (high - low):.1f}"
