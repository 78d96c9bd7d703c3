"""Training objectives for long-tailed data, per dataset and inside each dataset's own classes.

Every row has a dataset (its head positions 0..num_classes-1; the other logits are masked to -inf when
model.enable_logits_masking is on). The objectives below never put probability mass on another
dataset's classes, whether or not the logits are masked:

- `ce`: cross-entropy, optionally label-smoothed: (1 - eps) * -log p_true + eps * mean over the row's own
  classes of -log p_c (torch's label_smoothing spreads over every column, masked ones included, which
  would be infinite under masking).
- `focal` (Lin et al. 2017): (1 - p_true)^gamma times the (smoothed) cross-entropy.
- `class_balanced` (Cui et al. 2019): cross-entropy weighted per class by (1 - beta) / (1 - beta^n_c).

Class weights (`auto` = inverse frequency, class_balanced's, or given) are normalised per dataset so
that their mean over that dataset's training images is 1: the objective keeps the scale of plain
cross-entropy and the per-dataset mix keeps meaning the share of the gradient each dataset gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def class_counts(labels: Sequence[int], dataset_ids: Sequence[int], sizes: Sequence[int]) -> list[np.ndarray]:
    """Training images per class of each dataset (in head order)."""
    labels, dataset_ids = np.asarray(labels, dtype=np.int64), np.asarray(dataset_ids, dtype=np.int64)
    return [np.bincount(labels[dataset_ids == i], minlength=size).astype(np.float64)[:size]
            for i, size in enumerate(sizes)]


def normalised(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`weights` scaled so that their mean over the dataset's training images is 1."""
    total = counts.sum()
    mean = (weights * counts).sum() / total if total > 0 else 1.0
    return weights / mean if mean > 0 else weights


def inverse_frequency_weights(counts: np.ndarray) -> np.ndarray:
    """1 / n_c (a class without training images gets the largest weight seen: it cannot be computed)."""
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    if (counts == 0).any():
        weights[counts == 0] = weights.max() if (counts > 0).any() else 1.0
    return normalised(weights, counts)


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. 2019: (1 - beta) / (1 - beta^n_c), the inverse of the effective number of images."""
    effective = np.where(counts > 0, (1.0 - np.power(beta, counts)) / (1.0 - beta), 1.0)
    return normalised(1.0 / effective, counts)


def weight_table(settings, names: Sequence[str], counts: list[np.ndarray], num_labels: int) -> np.ndarray | None:
    """(datasets, num_labels) class weights for `settings` (training.loss), or None for unweighted."""
    per_dataset: list[np.ndarray] | None = None
    if settings.type == "class_balanced":
        per_dataset = [class_balanced_weights(c, settings.class_balanced_beta) for c in counts]
    elif settings.class_weights == "auto":
        per_dataset = [inverse_frequency_weights(c) for c in counts]
    elif isinstance(settings.class_weights, Mapping):
        given = settings.class_weights
        per_dataset = [normalised(np.asarray(given[name], dtype=np.float64), c) if name in given else np.ones(len(c))
                       for name, c in zip(names, counts, strict=True)]
    if per_dataset is None:
        return None
    table = np.ones((len(names), num_labels), dtype=np.float64)
    for i, weights in enumerate(per_dataset):
        table[i, :len(weights)] = weights
    return table


class Objective:
    """Per-row objective for (masked) logits; `None` settings-equivalent to plain cross-entropy."""

    def __init__(self, settings, weights: np.ndarray | None, device: torch.device):
        self.type = settings.type
        self.gamma = float(settings.focal_gamma)
        self.smoothing = float(settings.label_smoothing)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, num_classes: torch.Tensor,
                 dataset_ids: torch.Tensor, ce: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row objective values (float32); `ce`: the rows' plain cross-entropy if already computed."""
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1) if ce is None else ce
        loss = nll
        if self.smoothing > 0:
            own = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) < num_classes.unsqueeze(1)
            spread = -(logp.masked_fill(~own, 0.0)).sum(dim=1) / num_classes.to(logp.dtype)
            loss = (1.0 - self.smoothing) * nll + self.smoothing * spread
        if self.type == "focal" and self.gamma > 0:
            p_true = torch.exp(-nll)
            loss = (1.0 - p_true).clamp(min=0.0).pow(self.gamma) * loss
        if self.weights is not None:
            loss = loss * self.weights[dataset_ids, labels]
        return loss
