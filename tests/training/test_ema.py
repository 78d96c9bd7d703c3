"""training.ema: the average against its closed form, the swap in and out, and its checkpointed state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from food_multids.config import ConfigError, ProjectConfig
from food_multids.training.ema import WeightAverage
from tests.conftest import with_overrides


def test_the_average_equals_its_closed_form_after_start_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # what does not train is not averaged
    decay, start = 0.9, 2
    ema = WeightAverage(model, decay, start_step=start)
    assert len(ema.shadow) == 1
    history = []
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))  # an optimizer step
        history.append(model.weight.detach().clone())
        ema.update(step)
    # Steps 1-2 (<= start_step): the weights themselves; steps 3-6 averaged onto the weights of step 2.
    want = history[1]
    for weights in history[2:]:
        want = decay * want + (1 - decay) * weights
    torch.testing.assert_close(ema.shadow[0], want, rtol=1e-6, atol=1e-6)
    closed = decay ** 4 * history[1] + sum((1 - decay) * decay ** (6 - k) * history[k - 1] for k in range(3, 7))
    torch.testing.assert_close(ema.shadow[0], closed, rtol=1e-5, atol=1e-6)
    assert ema.averaged_steps == 4


def test_applied_swaps_the_average_in_and_the_trained_weights_back():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    ema = WeightAverage(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema.update(1)  # shadow: 0.5 * initial + 0.5 * 1
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.applied():
        for p, s in zip(model.parameters(), ema.shadow, strict=True):
            assert torch.equal(p, s.to(torch.bfloat16))
        assert ema.shadow[0].dtype == torch.float32  # the average is kept in float32
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p, t)


def test_the_state_round_trips_and_a_wrong_model_is_named():
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, 0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1)
    ema.update(2)
    other = WeightAverage(copy.deepcopy(model), 0.99)
    other.load_state(ema.state())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow, strict=True))
    assert other.averaged_steps == 2
    with pytest.raises(ValueError, match="other model settings"):
        WeightAverage(nn.Linear(4, 2), 0.99).load_state(ema.state())


@pytest.mark.parametrize(("ema", "deepspeed", "message"), [
    ({"decay": 1.0}, None, "params:training.ema.decay must be in (0, 1), e.g. 0.999, got 1.0"),
    ({"decay": 0.0}, None, "params:training.ema.decay must be in (0, 1), e.g. 0.999, got 0.0"),
    ({"start_step": -1}, None, "params:training.ema.start_step must be >= 0, got -1"),
    ({"decay": 0.999}, {"zero_optimization": {"stage": 3}}, "params:training.ema is not supported with ZeRO-3"),
    ({"decy": 0.9}, None, "params:training.ema.decy is not a known setting (did you mean 'decay'?)"),
    ({"decay": "abc"}, None, "params:training.ema.decay must be a number, got 'abc'"),
])
def test_bad_ema_settings_are_config_errors(two_datasets, ema, deepspeed, message):
    params = with_overrides(copy.deepcopy(two_datasets), training={"ema": ema})
    if deepspeed:
        params["deepspeed"] = deepspeed
    with pytest.raises(ConfigError) as info:
        ProjectConfig.from_params(params)
    assert message in str(info.value)
