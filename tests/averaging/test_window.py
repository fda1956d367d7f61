"""What an average spans: the effective window reported, and a horizon asked as a share of
training turned into settings whose weights do sit in that share."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_wavg import WAvgCallback, WAvgConfig
from hf_wavg.averaging import DecaySchedule
from hf_wavg.averaging.methods import METHODS
from hf_wavg.averaging.window import HORIZON_TOLERANCE, update_steps
from hf_wavg.model_card import averaging_card_section
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


HORIZON_METHODS = sorted(name for name, method in METHODS.items() if method.horizon_sets)
HORIZONS = (0.02, 0.05, 0.2, 1 / 3, 0.9)
RUN_LENGTHS = (50, 214, 1_000, 10_000, 100_000)


def test_every_method_with_a_horizon_is_held_to_it():
    assert HORIZON_METHODS == ["ema", "lawa", "swa"]


@pytest.mark.parametrize("method", HORIZON_METHODS)
def test_a_horizon_is_delivered_at_the_end_of_any_run_or_said_to_be_out_of_reach(method, caplog):
    """Over horizons of 2-90% and runs of 50-100,000 steps, the window at the end of training,
    measured by running the strategy on indicator snapshots, is the one the horizon promises
    (EMA: the time constant, half the horizon; SWA and LAWA: the horizon) to within 10% or one
    update interval; where no setting of the method can give it, the log and the record say so."""
    for horizon in HORIZONS:
        for max_steps in RUN_LENGTHS:
            config = WAvgConfig(method=method, horizon=horizon, average_parameters="all")
            resolved = config.resolved(max_steps)
            promised = config.promised_window(max_steps)
            assert promised == pytest.approx(horizon * max_steps / (2 if method == "ema" else 1))
            measured = effective_window_from_the_update_rule(resolved, max_steps)
            tolerance = max(HORIZON_TOLERANCE * promised, resolved.update_every)
            delivered = abs(measured - promised) <= tolerance
            caplog.clear()
            callback, warnings = begin(config, max_steps, caplog)
            planned = callback.window(len(callback.update_steps))
            assert planned.window_steps == pytest.approx(measured, rel=1e-5), (horizon, max_steps)
            assert planned.delivers_promise is delivered
            assert planned.describe()["promise_delivered"] is delivered
            assert any("too few updates" in w for w in warnings) is not delivered
            if not delivered:  # only LAWA, whose window is a multiple of its k snapshots
                assert method == "lawa", (horizon, max_steps, measured, promised)
                closest = min(abs(config.lawa_k * every - promised) for every in range(1, max_steps + 1))
                assert closest > HORIZON_TOLERANCE * promised and closest > 1


def test_a_long_horizon_on_a_short_run_is_not_capped_by_the_warm_up():
    """214 steps: the rational warm-up capped the decay at 215/224, so the default (0.2) and a
    third of the run gave the same ~11% window; each now gets its own (half its horizon)."""
    shares = {}
    for horizon in (0.2, 1 / 3):
        resolved = WAvgConfig(horizon=horizon).resolved(214)
        assert resolved.ema_schedule == "mean" and resolved.build_strategy().schedule(213) == resolved.ema_decay
        shares[horizon] = effective_window_from_the_update_rule(resolved, 214) / 214
    assert shares[0.2] == pytest.approx(0.1, abs=0.01) and shares[1 / 3] == pytest.approx(1 / 6, abs=0.01)
    rational = replace(WAvgConfig(horizon=1 / 3).resolved(214), ema_schedule="rational")
    assert effective_window_from_the_update_rule(rational, 214) / 214 < 0.12  # what it was


def test_a_horizon_overrides_an_explicit_schedule_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_wavg.config"):
        WAvgConfig(horizon=0.3, ema_schedule="power")
        WAvgConfig(ema_schedule="power")  # the default horizon applies too
    overrides = [r.getMessage() for r in caplog.records if "overrides ema_schedule='power'" in r.getMessage()]
    assert len(overrides) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wavg.config"):
        explicit = WAvgConfig(ema_decay=0.99, ema_schedule="power")
    assert not caplog.records and explicit.resolved(100) == explicit  # an explicit decay keeps its warm-up


def test_a_horizon_out_of_reach_is_said_in_the_record_and_the_card(caplog):
    callback, warnings = begin(WAvgConfig(method="lawa", horizon=0.02), 50, caplog)  # one step for k = 5 snapshots
    record = callback.window(len(callback.update_steps)).describe()
    assert record["promise_delivered"] is False and record["promised_window_steps"] == 1.0
    assert any("horizon=0.02 asks for an effective window of 1.0 steps" in w for w in warnings)
    card = averaging_card_section({"averager": callback.averager.describe(), "config": {}, "window": record})
    assert "| horizon not delivered | asked for 1 steps; too few updates in this run |" in card
    caplog.clear()
    callback, _ = begin(WAvgConfig(method="lawa", horizon=0.5), 50, caplog)
    record = callback.window(len(callback.update_steps)).describe()
    assert record["promise_delivered"] is True and record["effective_window_steps"] == 25
    assert "not delivered" not in averaging_card_section({"averager": {}, "config": {}, "window": record})
    assert "promised_window_steps" not in callback.window(3).describe()  # only the end of the run is promised
