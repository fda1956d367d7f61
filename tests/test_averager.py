"""WeightAverager: the formula, non-finite snapshots, swapping in and out, and a state that round-trips."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_wavg import EMA, LAWA, SWA, DecaySchedule, WeightAverager
from tests.models import TiedLM, perturb_
from tests.reference import assert_close_to_reference, ema_reference


def record(model):
    return [p.detach().clone() for p in model.parameters()]


def test_model_average_equals_formula_and_skips_non_finite(caplog):
    model = TiedLM()
    decay = DecaySchedule(0.8, "rational")
    averager = WeightAverager(model, EMA(decay), parameters="all")
    folded = []
    with caplog.at_level(logging.WARNING, logger="hf_wavg.averager"):
        for step in range(1, 9):
            perturb_(model, seed=step)
            if step in (3, 6):  # a diverged step: NaN in one tensor
                saved = model.norm.bias.detach().clone()
                model.norm.bias.data[0] = float("nan")
                assert averager.update(step) is False
                model.norm.bias.data.copy_(saved)
                continue
            assert averager.update(step) is True
            folded.append(record(model))
    assert averager.num_skipped == 2 and averager.num_updates == 6
    assert sum("NaN or inf" in r.message for r in caplog.records) == 1  # warned once
    assert_close_to_reference(averager.strategy.average(), ema_reference(folded, decay), rtol=1e-6, atol=1e-6)


def test_swapped_in_restores_raw_weights_bit_for_bit_even_on_error():
    model = TiedLM().to(torch.bfloat16)
    averager = WeightAverager(model, SWA(), parameters="all", buffers="average")
    for step in range(3):
        perturb_(model, seed=step)
        averager.update(step)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError), averager.swapped_in():
        expected = averager.strategy.average()[0].to(torch.bfloat16)
        assert torch.equal(model.embed.weight, expected)
        with averager.swapped_in():  # re-entrant
            pass
        raise KeyError("boom")
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key


@pytest.mark.parametrize("strategy", [lambda: EMA(), lambda: LAWA(k=2)])
def test_save_load_round_trip(tmp_path, strategy):
    model = TiedLM()
    averager = WeightAverager(model, strategy(), parameters="all")
    for step in range(3):
        perturb_(model, seed=step)
        averager.update(step)
    averager.save(tmp_path)
    restored = WeightAverager(model, strategy(), parameters="all")
    restored.load(tmp_path)
    assert restored.num_updates == 3 and restored.last_update_step == 2
    for a, b in zip(restored.strategy.average(), averager.strategy.average()):
        assert torch.equal(a, b)


def test_lawa_resume_is_bitwise_whatever_the_ring_position(tmp_path):
    model = TiedLM()
    running = WeightAverager(model, LAWA(k=3), parameters="all")
    for step in range(5):  # the ring has wrapped: its oldest snapshot is not in slot 0
        perturb_(model, seed=step)
        running.update(step)
    running.save(tmp_path)
    resumed = WeightAverager(TiedLM(), LAWA(k=3), parameters="all")
    resumed.load(tmp_path)
    for step in range(5, 7):
        for a, b in zip(resumed.strategy.average(), running.strategy.average()):
            assert torch.equal(a, b)
        perturb_(model, seed=step)
        running.update(step)
        with torch.no_grad():
            for live, raw in zip(resumed.selection.tensors(), running.selection.tensors()):
                live.copy_(raw)
        resumed.update(step)
