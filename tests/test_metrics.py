from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, top_k_accuracy_score

from food_multids.metrics import macro_f1, topk_accuracy


@pytest.mark.parametrize("seed", range(5))
def test_topk_and_macro_f1_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    labels = rng.integers(0, c, n)
    scores = rng.random((n, c)) + np.eye(c)[labels] * rng.random((n, 1))
    order = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        assert topk_accuracy(labels, order, k) == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(c)))
    preds = order[:, 0]
    assert macro_f1(labels, preds) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_macro_f1_counts_classes_seen_only_in_predictions():
    labels, preds = np.array([0, 0, 1]), np.array([0, 2, 1])
    assert macro_f1(labels, preds) == pytest.approx(f1_score(labels, preds, average="macro"))
