"""What an average spans: the effective window reported, and a horizon asked as a share of
training turned into settings whose weights do sit in that share."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_wavg import WAvgCallback, WAvgConfig
from hf_wavg.averaging import DecaySchedule
from hf_wavg.averaging.window import update_steps
from tests.models import TiedLM


def weight_on_last(config: WAvgConfig, max_steps: int, last: int) -> float:
    """Total weight the average of a ``max_steps`` run puts on its last ``last`` steps,
    found by running the strategy itself on indicator snapshots (0 before, 1 inside)."""
    strategy = config.build_strategy()
    strategy.initialize([torch.zeros(1, dtype=torch.float64)])
    for step in update_steps(config.start_at(max_steps), config.update_every, max_steps):
        strategy.update([torch.tensor([float(step > max_steps - last)], dtype=torch.float64)])
    return float(strategy.average()[0])


def ema_weights_from_schedule(schedule: DecaySchedule, n: int) -> list[float]:
    """Weight of each of n snapshots in the EMA, from the schedule: the first is copied,
    snapshot i (i >= 2) enters with 1 - beta_{i-1} and decays by every later beta."""
    entering = [1.0] + [1.0 - schedule(i - 1) for i in range(2, n + 1)]
    return [entering[i] * math.prod(schedule(j) for j in range(i + 1, n)) for i in range(n)]


@pytest.mark.parametrize("method", ["ema", "swa", "lawa"])
def test_a_horizon_of_20_percent_puts_at_least_80_percent_of_the_weight_there(method):
    resolved = WAvgConfig(method=method, horizon=0.2).resolved(200)
    assert weight_on_last(resolved, 200, 40) >= 0.8
    assert weight_on_last(resolved, 200, 200) == pytest.approx(1.0)
    if method == "ema":  # the same from the schedule's formula
        schedule = resolved.build_strategy().schedule
        weights = ema_weights_from_schedule(schedule, 200)
        assert sum(weights) == pytest.approx(1.0) and sum(weights[-40:]) >= 0.8
        assert sum(weights[-40:]) == pytest.approx(weight_on_last(resolved, 200, 40), rel=1e-6)  # a float32 average


def test_the_default_ema_spans_a_stated_share_whatever_the_run_length():
    for max_steps in (100, 1_000, 10_000):
        resolved = WAvgConfig().resolved(max_steps)
        assert weight_on_last(resolved, max_steps, max_steps // 5) >= 0.8
        assert weight_on_last(resolved, max_steps, max_steps // 50) < 0.5  # not the last weights


def effective_window_from_the_update_rule(config: WAvgConfig, max_steps: int) -> float:
    """For EMA, 1/(1-beta) of the last update, where 1-beta is the weight the last
    snapshot enters with: what the strategy gives an indicator of the last snapshot."""
    steps = update_steps(config.start_at(max_steps), config.update_every, max_steps)
    return config.update_every / weight_on_last(config, max_steps, max_steps - steps[-1] + 1)


@pytest.mark.parametrize(
    ("settings", "max_steps"),
    [({"ema_decay": 0.999}, 214), ({"ema_decay": 0.9, "update_every": 2}, 100), ({}, 500),
     ({"method": "swa", "start_fraction": 0.5}, 100), ({"method": "lawa", "lawa_k": 5, "update_every": 3}, 60)],
)
def test_the_reported_window_is_the_one_the_update_rule_gives(settings, max_steps, caplog):
    callback = WAvgCallback(WAvgConfig(average_parameters="all", **settings))
    args = TrainingArguments("unused", report_to="none")
    with caplog.at_level(logging.INFO, logger="hf_wavg.callback"):
        callback.on_train_begin(args, TrainerState(max_steps=max_steps), TrainerControl(), model=TiedLM())
    steps = callback.update_steps
    window = callback.window(len(steps))
    config = callback.run_config
    if config.method == "ema":
        expected = effective_window_from_the_update_rule(config, max_steps)
    elif config.method == "swa":
        expected = len(steps) * config.update_every
    else:
        expected = config.lawa_k * config.update_every
    assert window.window_steps == pytest.approx(expected, rel=1e-5)  # the update rule runs in float32
    assert (window.first_step, window.last_step, window.snapshots) == (steps[0], steps[-1], len(steps))
    assert window.share == pytest.approx(expected / max_steps)
    announced = [r for r in caplog.records if "the average will span" in r.getMessage()]
    assert len(announced) == 1 and f"{window.share:.0%} of the {max_steps}-step run" in announced[0].getMessage()
    assert (announced[0].levelno == logging.WARNING) == (window.share < 0.05)


def begin(config: WAvgConfig, max_steps: int, caplog) -> tuple[WAvgCallback, list[str]]:
    callback = WAvgCallback(config)
    with caplog.at_level(logging.WARNING, logger="hf_wavg.callback"):
        callback.on_train_begin(TrainingArguments("unused", report_to="none"), TrainerState(max_steps=max_steps),
                                TrainerControl(), model=TiedLM())
    return callback, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_narrow_window_and_a_decay_that_never_takes_effect_are_warned_about(caplog):
    callback, warnings = begin(WAvgConfig(ema_decay=0.9, ema_schedule="constant"), 2000, caplog)
    assert callback.window(2000).share < 0.05
    assert any("close to the last weights" in w and "horizon" in w for w in warnings)
    caplog.clear()
    # A 214-step fine-tune with decay 0.999: the rational warm-up caps it at 215/224.
    callback, warnings = begin(WAvgConfig(ema_decay=0.999), 214, caplog)
    assert any(f"ema_decay=0.999 never takes effect in this run: its warm-up caps the decay at {214 / 223:.4g}" in w
               for w in warnings)
    caplog.clear()
    _, warnings = begin(WAvgConfig(), 214, caplog)  # the default: 20% of the run
    assert not warnings
