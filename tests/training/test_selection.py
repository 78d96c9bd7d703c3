"""The best-model rule and the re-rank candidates, on recorded per-image results (no model, no torch)."""

from __future__ import annotations

import copy

import numpy as np

from food_multids.helpers.metrics import stratified_summary
from food_multids.training.selection import BestModelSelector, metric_rows

NAMES = ("a", "b")


def scored(correct: np.ndarray, dataset_id: np.ndarray) -> tuple[dict, dict]:
    """A partial evaluation's metrics and its per-image rows (all images of the subset)."""
    count = np.bincount(dataset_id, minlength=2).astype(float)
    right = np.bincount(dataset_id, weights=correct, minlength=2)
    metrics = stratified_summary(count - right, right, count, NAMES, population=count * 4)
    rows = {"sample_id": np.arange(len(correct)), "dataset_id": dataset_id, "correct": correct.astype(float),
            "loss": 1.0 - correct}
    return metrics, metric_rows("overall_accuracy", NAMES, rows)


def flipped(base: np.ndarray, rng: np.random.Generator, wins: int, losses: int) -> np.ndarray:
    out = base.copy()
    out[rng.choice(np.flatnonzero(base == 0), wins, replace=False)] = 1
    out[rng.choice(np.flatnonzero(base == 1), losses, replace=False)] = 0
    return out


def selector(rule="paired", k=3) -> BestModelSelector:
    return BestModelSelector("overall_accuracy", rule, True, z=1.0, keep_top_k=k, num_datasets=2)


def test_metric_rows_take_the_metrics_own_dataset_and_value():
    rows = {"sample_id": np.array([7, 8, 9]), "dataset_id": np.array([0, 1, 1]), "correct": np.array([1.0, 0.0, 1.0]),
            "loss": np.array([0.1, 2.0, 0.3])}
    b = metric_rows("b_loss", NAMES, rows)
    assert b["sample_id"].tolist() == [8, 9] and b["value"].tolist() == [2.0, 0.3]
    assert metric_rows("overall_accuracy", NAMES, rows)["value"].tolist() == [1.0, 0.0, 1.0]
    assert metric_rows("out_of_range_predictions", NAMES, rows) is None


def test_a_gain_within_noise_is_kept_as_a_candidate_but_does_not_become_the_best():
    rng = np.random.default_rng(0)
    ids = np.repeat([0, 1], 1000)
    first = (rng.random(2000) < 0.8).astype(float)
    pick = selector()
    assert pick.observe(10, *scored(first, ids)).improved
    noisy = flipped(first, rng, wins=14, losses=10)  # +4 images of 2,000
    verdict = pick.observe(20, *scored(noisy, ids))
    assert not verdict.improved and verdict.kept and "not more than 1 x SE" in verdict.reason
    assert selector("point").observe(10, *scored(first, ids)).improved  # (the point rule would move)
    clear = flipped(first, rng, wins=80, losses=10)
    verdict = pick.observe(30, *scored(clear, ids))
    assert verdict.improved and pick.best["step"] == 30 and pick.best["best_model_reason"] == verdict.reason
    assert [c["step"] for c in pick.candidates] == [10, 20, 30]


def test_exactly_k_candidates_the_best_always_among_them_and_a_resume_decides_alike():
    rng = np.random.default_rng(1)
    ids = np.repeat([0, 1], 300)
    base = (rng.random(600) < 0.6).astype(float)
    # A plateau with noise: accuracies wander up and down around 0.6.
    runs = [flipped(base, rng, wins=int(win), losses=int(loss)) for win, loss in rng.integers(0, 30, size=(12, 2))]
    straight, resumed = selector(k=3), selector(k=3)
    verdicts = []
    for i, correct in enumerate(runs):
        verdicts.append(straight.observe(10 * (i + 1), *scored(correct, ids)))
        assert len(straight.candidates) == min(i + 1, 3)
        assert straight.best["step"] in [c["step"] for c in straight.candidates]
        if i == 5:  # a checkpoint here; a fresh process restores it and goes on
            resumed.load_state(copy.deepcopy(straight.state()))
        elif i > 5:
            assert resumed.observe(10 * (i + 1), *scored(correct, ids)) == verdicts[-1]
    assert resumed.state()["candidates"] == straight.state()["candidates"] and resumed.best == straight.best
    values = {10 * (i + 1): scored(c, ids)[0]["overall_accuracy"] for i, c in enumerate(runs)}
    others = sorted((s for s in values if s != straight.best["step"]), key=lambda s: (-values[s], s))[:2]
    assert sorted(c["step"] for c in straight.candidates) == sorted([straight.best["step"], *others])
    single = selector(k=1)  # k = 1: only the best, as before candidates existed
    for i, correct in enumerate(runs):
        verdict = single.observe(10 * (i + 1), *scored(correct, ids))
        assert verdict.kept == verdict.improved and [c["step"] for c in single.candidates] == [single.best["step"]]


def test_lower_bound_and_loss_metrics_use_the_pessimistic_end():
    rng = np.random.default_rng(2)
    ids = np.repeat([0, 1], 500)
    first = (rng.random(1000) < 0.7).astype(float)
    pick = BestModelSelector("overall_loss", "lower_bound", False, num_datasets=2)
    metrics, _ = scored(first, ids)
    rows = metric_rows("overall_loss", NAMES, {"sample_id": np.arange(1000), "dataset_id": ids,
                                               "correct": first, "loss": 1.0 - first})
    pick.observe(10, metrics, rows)
    assert pick.best["bound"] > metrics["overall_loss"]  # an upper bound for a loss
