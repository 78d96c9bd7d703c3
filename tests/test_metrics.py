from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, top_k_accuracy_score

from food_multids.helpers.metrics import (
    choose_best,
    macro_f1,
    stratified_mean_se,
    stratified_summary,
    summarize,
    topk_accuracy,
    wilson_interval,
    z_for,
)


@pytest.mark.parametrize("seed", range(5))
def test_topk_and_macro_f1_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    labels = rng.integers(0, c, n)
    scores = rng.random((n, c)) + np.eye(c)[labels] * rng.random((n, 1))
    order = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels, scores, k=k, labels=range(c))
        assert topk_accuracy(labels, order, k) == pytest.approx(expected)
    preds = order[:, 0]
    assert macro_f1(labels, preds) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_macro_f1_counts_classes_seen_only_in_predictions():
    labels, preds = np.array([0, 0, 1]), np.array([0, 2, 1])
    assert macro_f1(labels, preds) == pytest.approx(f1_score(labels, preds, average="macro"))


# A: 1,000 validation images, 200 scored, 180 right; B: 10,000, 200 scored, 140 right (eval ratios 0.2 and 0.02).
NAMES = ("a", "b")
LOSS, CORRECT, COUNT, POPULATION = [40.0, 120.0], [180.0, 140.0], [200.0, 200.0], [1000.0, 10000.0]


def test_the_overall_partial_estimate_weights_datasets_by_their_full_validation_size():
    got = stratified_summary(LOSS, CORRECT, COUNT, NAMES, POPULATION)
    assert got["overall_accuracy"] == pytest.approx((1000 * 0.9 + 10000 * 0.7) / 11000)  # 0.7182, not 0.8
    assert got["overall_accuracy_pooled"] == pytest.approx(0.8)
    assert got["overall_loss"] == pytest.approx((1000 * 0.2 + 10000 * 0.6) / 11000)
    assert got["a_accuracy"] == 0.9 and got["b_samples"] == 200  # per dataset: as before
    z = z_for(0.95)
    variance = 0.0
    for c, n, big_n in zip(CORRECT, COUNT, POPULATION, strict=True):
        adjusted = (c + z * z / 2) / (n + z * z)
        variance += (big_n / 11000) ** 2 * (1 - n / big_n) * adjusted * (1 - adjusted) / (n - 1)
    assert got["overall_accuracy_ci_high"] - got["overall_accuracy"] == pytest.approx(z * math.sqrt(variance))
    assert got["overall_accuracy"] - got["overall_accuracy_ci_low"] == pytest.approx(z * math.sqrt(variance))


def test_a_dataset_scored_whole_adds_no_sampling_error():
    whole = stratified_summary(LOSS, CORRECT, COUNT, NAMES, [200.0, 10000.0])  # A's 200 are all of A
    assert whole["a_accuracy_ci_low"] == whole["a_accuracy_ci_high"] == 0.9
    z = z_for(0.95)
    b = (140 + z * z / 2) / (200 + z * z)
    only_b = z * (10000 / 10200) * math.sqrt((1 - 200 / 10000) * b * (1 - b) / 199)
    assert whole["overall_accuracy_ci_high"] - whole["overall_accuracy"] == pytest.approx(only_b)
    every = stratified_summary(LOSS, CORRECT, COUNT, NAMES, COUNT)  # everything scored: exact
    assert every["overall_accuracy_ci_low"] == every["overall_accuracy_ci_high"] == every["overall_accuracy"]


def test_equal_eval_ratios_give_the_pooled_numbers_exactly():
    before = summarize(LOSS, CORRECT, COUNT, NAMES)
    got = stratified_summary(LOSS, CORRECT, COUNT, NAMES, [1000.0, 1003.0], proportional=True)
    for key in ("overall_accuracy", "overall_loss", "overall_samples", "a_accuracy", "b_loss"):
        assert got[key] == before[key], key


@pytest.mark.parametrize("correct", [0, 3, 50, 97, 100])
def test_intervals_contain_the_point_and_shrink_with_more_images(correct):
    widths = []
    for scale in (1, 4, 16):
        low, high = wilson_interval(correct * scale, 100 * scale, z_for(0.95))
        assert low <= correct / 100 <= high
        widths.append(high - low)
        got = stratified_summary([0.0, 0.0], [correct * scale, 50 * scale], [100 * scale, 100 * scale], NAMES)
        assert got["overall_accuracy_ci_low"] <= got["overall_accuracy"] <= got["overall_accuracy_ci_high"]
    assert widths[0] > widths[1] > widths[2] > 0  # width even at 0 % and 100 %
    assert wilson_interval(correct, 100, z_for(0.95), sampled_fraction=0.5)[1] - \
        wilson_interval(correct, 100, z_for(0.95), sampled_fraction=0.5)[0] < widths[0]  # half the set scored


def paired_case(seed: int, wins: int, losses: int, n: int = 2000):
    """The best model right on 85 % of n images; a candidate that differs on wins + losses of them."""
    rng = np.random.default_rng(seed)
    best = (rng.random(n) < 0.85).astype(float)
    cand = best.copy()
    right, wrong = np.flatnonzero(best == 1), np.flatnonzero(best == 0)
    cand[rng.choice(wrong, wins, replace=False)] = 1
    cand[rng.choice(right, losses, replace=False)] = 0
    strata = np.zeros(n, dtype=np.int64)
    return cand.mean(), best.mean(), stratified_mean_se(cand - best, strata, np.array([1.0]), np.array([0.0]))


def test_the_paired_rule_refuses_a_gain_within_noise_and_takes_a_clear_one():
    value, best_value, paired = paired_case(0, wins=22, losses=18)  # +4 images of 2,000: noise
    best = {"value": best_value, "step": 40, "bound": None}
    assert value > best_value and choose_best("point", True, value, best)[0]  # the point rule chases it
    improved, reason = choose_best("paired", True, value, best, z=1.0, paired=paired)
    assert not improved and "not more than 1 x SE" in reason and "step 40" in reason
    value, best_value, paired = paired_case(1, wins=70, losses=10)  # +60 images: real
    improved, reason = choose_best("paired", True, value, {**best, "value": best_value}, z=1.0, paired=paired)
    assert improved and reason.startswith("paired: +0.0300")
    # A loss: lower is better, so a drop is the gain.
    assert choose_best("paired", False, 0.5, {"value": 0.6, "step": 1}, paired=(-0.1, 0.01))[0]
    assert not choose_best("paired", False, 0.7, {"value": 0.6, "step": 1}, paired=(0.1, 0.01))[0]
    # No sampling error (every image scored): any gain counts, none does not.
    assert choose_best("paired", True, 0.81, {"value": 0.8, "step": 1}, paired=(0.01, 0.0))[0]
    assert not choose_best("paired", True, 0.8, {"value": 0.8, "step": 1}, paired=(0.0, 0.0))[0]


def test_the_lower_bound_rule_compares_the_pessimistic_ends():
    best = {"value": 0.80, "step": 10, "bound": 0.76}
    assert not choose_best("lower_bound", True, 0.82, best, bound=0.75)[0]  # higher, but less sure
    assert choose_best("lower_bound", True, 0.81, best, bound=0.77)[0]
    assert choose_best("lower_bound", False, 0.4, {"value": 0.5, "step": 1, "bound": 0.6}, bound=0.55)[0]
    assert choose_best("point", True, 0.5, None) == (True, "first evaluation")
    for rule, extra in (("point", {}), ("paired", {"paired": (np.float64(0.1), np.float64(0.01))}),
                        ("lower_bound", {"bound": np.float64(0.9)})):  # the history is JSON: plain bools
        assert type(choose_best(rule, True, np.float64(0.9), best, **extra)[0]) is bool, rule


def test_the_stratified_mean_and_its_standard_error_by_hand():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    strata = np.array([0, 0, 0, 1, 1, 1])
    mean, se = stratified_mean_se(values, strata, np.array([0.25, 0.75]), np.array([0.5, 0.0]))
    assert mean == pytest.approx(0.25 * 2 / 3 + 0.75 * 1 / 3)
    s2 = np.var([1, 0, 1], ddof=1)  # both strata have the same sample variance
    assert se == pytest.approx(math.sqrt(0.25 ** 2 * 0.5 * s2 / 3 + 0.75 ** 2 * s2 / 3))
