"""Adaptive mixing: the update rule on a toy loss table, the sampler following a schedule of proportions."""

from __future__ import annotations

import numpy as np
import pytest

from food_multids.config import ConfigError, MixAdaptiveSettings, ProjectConfig
from food_multids.data.adaptive_mix import AdaptiveMix
from food_multids.data.sampler import MixingSampler
from tests.conftest import with_overrides


def test_the_update_equals_the_hand_computed_weights_with_prior_share_and_floor():
    prior = np.array([0.5, 0.3, 0.2])
    settings = MixAdaptiveSettings(step_size=2.0, smoothing=0.5, reference="none", prior_mix=0.2, min_weight=0.1)
    mix = AdaptiveMix(settings, prior)
    assert mix.mix() == pytest.approx(prior)  # before any update: the temperature mix itself
    first = mix.update(np.array([1.0, 2.0, 3.0]))
    log_w = np.log(prior) + 2.0 * np.array([1.0, 2.0, 3.0])  # the first signal is taken as is
    w = np.exp(log_w) / np.exp(log_w).sum()
    expected = 0.8 * w + 0.2 * prior
    expected = np.maximum(expected, 0.1) / np.maximum(expected, 0.1).sum()
    assert first == pytest.approx(expected) and first.sum() == pytest.approx(1.0)
    assert first[2] > prior[2] and first[0] < prior[0]  # the higher loss gains weight
    assert first.min() >= 0.1 - 1e-12
    second = mix.update(np.array([3.0, np.nan, 1.0]))  # NaN: no sample this time, the value is kept
    smoothed = np.array([0.5 * 1 + 0.5 * 3, 2.0, 0.5 * 3 + 0.5 * 1])
    log_w = log_w + 2.0 * smoothed
    w = np.exp(log_w - log_w.max()) / np.exp(log_w - log_w.max()).sum()
    expected = np.maximum(0.8 * w + 0.2 * prior, 0.1)
    assert second == pytest.approx(expected / expected.sum())


def test_first_eval_reference_moves_weight_to_the_dataset_that_improves_least():
    mix = AdaptiveMix(MixAdaptiveSettings(step_size=5.0, smoothing=0.0, reference="first_eval", prior_mix=0.0,
                                          min_weight=0.0), np.array([0.5, 0.5]))
    assert mix.update(np.array([2.0, 4.0])) == pytest.approx([0.5, 0.5])  # no excess yet
    after = mix.update(np.array([1.0, 3.9]))  # the first fell by 1.0, the second by 0.1
    assert after[1] > 0.9
    restored = AdaptiveMix(mix.settings, np.array([0.5, 0.5]))
    restored.load_state(mix.state())
    assert restored.update(np.array([1.0, 3.0])) == pytest.approx(mix.update(np.array([1.0, 3.0])))


def batches(sampler: MixingSampler, epoch: int) -> list[np.ndarray]:
    sampler.set_position(epoch, 0)
    return [np.asarray(b) for b in sampler]


def test_the_sampler_follows_the_schedule_from_its_batch_on_and_is_a_function_of_it():
    ids = np.repeat([0, 1], [300, 300])
    make = lambda: MixingSampler(ids, 20, seed=3, strategy="adaptive", proportions=np.array([0.5, 0.5]))  # noqa: E731
    sampler = make()
    before = batches(sampler, 0)
    sampler.set_schedule([(0, 10, [0.9, 0.1])])
    after = batches(sampler, 0)
    assert [b.tolist() for b in after[:10]] == [b.tolist() for b in before[:10]]  # the past does not change
    share = np.mean([np.mean(ids[b] == 0) for b in after[10:]])
    assert share == pytest.approx(0.9, abs=0.01)
    assert np.mean([np.mean(ids[b] == 0) for b in before[10:]]) == pytest.approx(0.5, abs=0.01)
    again = make()  # a resumed run: the same schedule, the same batches, in this epoch and the next
    again.set_schedule([(0, 10, [0.9, 0.1])])
    assert [b.tolist() for b in batches(again, 0)] == [b.tolist() for b in after]
    assert [b.tolist() for b in batches(again, 1)] == [b.tolist() for b in batches(sampler, 1)]
    assert np.mean([np.mean(ids[b] == 0) for b in batches(again, 1)]) == pytest.approx(0.9, abs=0.01)


def test_adaptive_settings_are_checked(two_datasets):
    params = with_overrides(two_datasets, data={"mix_strategy": "adaptive"},
                            training={"max_steps": 10, "eval_steps": 10})
    with pytest.raises(ConfigError, match=r"data.mix_adaptive.signal is eval_loss.*eval_steps \(10\) >= "
                                          r"training.max_steps \(10\).*signal: train_loss"):
        ProjectConfig.from_params(params)
    params["data"]["mix_adaptive"] = {"signal": "train_loss"}
    assert ProjectConfig.from_params(params).data.mix_adaptive.signal == "train_loss"
    params["data"]["mix_adaptive"] = {"step_size": -1.0, "smoothing": 1.0, "prior_mix": 1.5, "min_weight": 0.6}
    with pytest.raises(ConfigError) as raised:
        ProjectConfig.from_params(params)
    text = str(raised.value)
    for key in ("step_size must be >= 0", "smoothing must be in [0, 1)", "prior_mix must be in [0, 1]",
                "min_weight must be in [0, 1/number of datasets]"):
        assert key in text, key


def test_a_dataset_without_samples_at_the_first_update_does_not_move_until_it_has_one():
    prior = np.array([0.5, 0.5])
    mix = AdaptiveMix(MixAdaptiveSettings(step_size=1.0, smoothing=0.5, prior_mix=0.0, min_weight=0.0), prior)
    mix.update(np.array([np.nan, 2.0]))
    assert mix.log_weights == pytest.approx(np.log(prior) + [0.0, 2.0])  # not treated as a loss of 0
    mix.update(np.array([1.0, 2.0]))
    assert mix.smoothed == pytest.approx([1.0, 2.0])  # its first value as is, not smoothed towards 0
