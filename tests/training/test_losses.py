"""training.loss: each objective against a value computed by hand on a small masked batch."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from food_multids.config import ConfigError, LossSettings, ProjectConfig
from food_multids.model.classifier import mask_logits
from food_multids.training.losses import (
    Objective,
    class_balanced_weights,
    class_counts,
    inverse_frequency_weights,
    weight_table,
)
from tests.conftest import with_overrides

# Two rows of a 4-column head: row 0 from a 2-class dataset (columns 2, 3 masked), row 1 from a 4-class one.
RAW = torch.tensor([[2.0, 0.0, 5.0, 7.0], [0.5, 1.0, -1.0, 0.0]])
NUM_CLASSES = torch.tensor([2, 4])
LABELS = torch.tensor([0, 1])
DATASETS = torch.tensor([0, 1])


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


P0 = softmax([2.0, 0.0])              # row 0 over its own two classes
P1 = softmax([0.5, 1.0, -1.0, 0.0])   # row 1 over its four


def objective(**settings) -> Objective:
    return Objective(LossSettings(**settings), None, torch.device("cpu"))


def test_plain_cross_entropy_on_masked_logits():
    got = objective(type="ce", label_smoothing=0.0)(mask_logits(RAW, NUM_CLASSES), LABELS, NUM_CLASSES, DATASETS)
    assert got.tolist() == pytest.approx([-math.log(P0[0]), -math.log(P1[1])], rel=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_label_smoothing_spreads_only_over_the_rows_own_classes(masked):
    eps = 0.1
    logits = mask_logits(RAW, NUM_CLASSES) if masked else RAW
    got = objective(label_smoothing=eps)(logits, LABELS, NUM_CLASSES, DATASETS)
    if masked:
        p0, p1 = P0, P1
    else:  # unmasked: the softmax runs over every column, the smoothing target still over the own classes
        p0, p1 = softmax([2.0, 0.0, 5.0, 7.0]), P1
    want0 = (1 - eps) * -math.log(p0[0]) + eps * -(math.log(p0[0]) + math.log(p0[1])) / 2
    want1 = (1 - eps) * -math.log(p1[1]) + eps * -sum(math.log(p) for p in p1) / 4
    assert got.tolist() == pytest.approx([want0, want1], rel=1e-6)
    assert torch.isfinite(got).all()  # torch's own label_smoothing would be infinite on masked columns


def test_focal_loss_down_weights_the_easy_row():
    gamma = 2.0
    got = objective(type="focal", focal_gamma=gamma)(mask_logits(RAW, NUM_CLASSES), LABELS, NUM_CLASSES, DATASETS)
    want = [(1 - P0[0]) ** gamma * -math.log(P0[0]), (1 - P1[1]) ** gamma * -math.log(P1[1])]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    smoothed = objective(type="focal", focal_gamma=gamma, label_smoothing=0.2)(
        mask_logits(RAW, NUM_CLASSES), LABELS, NUM_CLASSES, DATASETS)
    want0 = (1 - P0[0]) ** gamma * (0.8 * -math.log(P0[0]) + 0.2 * -(math.log(P0[0]) + math.log(P0[1])) / 2)
    assert smoothed[0].item() == pytest.approx(want0, rel=1e-5)


def test_auto_and_class_balanced_weights_come_from_the_counts():
    labels = [0] * 90 + [1] * 10 + [0, 1, 1, 2]
    datasets = [0] * 100 + [1] * 4
    counts = class_counts(labels, datasets, [2, 3])
    assert [c.tolist() for c in counts] == [[90.0, 10.0], [1.0, 2.0, 1.0]]
    auto = inverse_frequency_weights(counts[0])
    # 1/n_c, scaled so the mean weight over the dataset's images is 1.
    scale = 100 / (90 * (1 / 90) + 10 * (1 / 10))
    assert auto.tolist() == pytest.approx([scale / 90, scale / 10])
    assert (auto * counts[0]).sum() / counts[0].sum() == pytest.approx(1.0)
    beta = 0.99
    balanced = class_balanced_weights(counts[0], beta)
    raw = [(1 - beta) / (1 - beta ** 90), (1 - beta) / (1 - beta ** 10)]
    mean = (raw[0] * 90 + raw[1] * 10) / 100
    assert balanced.tolist() == pytest.approx([raw[0] / mean, raw[1] / mean])
    table = weight_table(LossSettings(class_weights="auto"), ["a", "b"], counts, num_labels=4)
    assert table.shape == (2, 4) and table[0, :2].tolist() == pytest.approx(auto.tolist())
    assert table[0, 2:].tolist() == [1, 1]
    given = weight_table(LossSettings(class_weights={"b": [1.0, 2.0, 1.0]}), ["a", "b"], counts, num_labels=4)
    assert given[0].tolist() == [1, 1, 1, 1] and given[1, :3].tolist() == pytest.approx([2 / 3, 4 / 3, 2 / 3])
    assert weight_table(LossSettings(), ["a", "b"], counts, num_labels=4) is None


def test_class_weights_multiply_each_rows_loss():
    weights = np.ones((2, 4))
    weights[1, 1] = 3.0
    got = Objective(LossSettings(class_weights="auto"), weights, torch.device("cpu"))(
        mask_logits(RAW, NUM_CLASSES), LABELS, NUM_CLASSES, DATASETS)
    assert got.tolist() == pytest.approx([-math.log(P0[0]), 3.0 * -math.log(P1[1])], rel=1e-6)


@pytest.mark.parametrize(("loss", "message"), [
    ({"focal_gamma": -1}, "params:training.loss.focal_gamma must be >= 0, got -1.0"),
    ({"label_smoothing": 1.0}, "params:training.loss.label_smoothing must be in [0, 1), got 1.0"),
    ({"class_balanced_beta": 1.0}, "params:training.loss.class_balanced_beta must be in [0, 1), got 1.0"),
    ({"class_weights": {"alpha": [1, 2]}},
     "params:training.loss.class_weights.alpha must list 3 weights (one per class of 'alpha'), got 2"),
    ({"class_weights": {"alpah": [1, 2, 3]}},
     "params:training.loss.class_weights.alpah is not a dataset of datasets.dataset_configs (did you mean 'alpha'?)"),
    ({"class_weights": {"alpha": [1, 0, 3]}}, "params:training.loss.class_weights.alpha must be positive numbers"),
    ({"type": "class_balanced", "class_weights": "auto"},
     "params:training.loss.class_weights must be null with type: class_balanced"),
    ({"type": "dice"}, "params:training.loss.type must be one of 'ce', 'focal', 'class_balanced', got 'dice'"),
])
def test_bad_loss_settings_are_config_errors(two_datasets, loss, message):
    with pytest.raises(ConfigError) as info:
        ProjectConfig.from_params(with_overrides(copy.deepcopy(two_datasets), training={"loss": loss}))
    assert message in str(info.value)
