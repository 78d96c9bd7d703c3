"""Pure metric functions: arrays in, dict[str, float] out. No torch."""

from __future__ import annotations

from collections.abc import Sequence

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
                         f"({acc:.2%}), Samples: {int(metrics[f'{name}_samples']):,}")
    if "overall_samples" in metrics:
        acc = metrics["overall_accuracy"]
        lines.append(f"📈 Overall:   Loss: {metrics['overall_loss']:.4f}, Accuracy: {acc:.4f} "
                     f"({acc:.2%}), Samples: {int(metrics['overall_samples']):,}")
    return lines
