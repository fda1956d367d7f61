"""WeightAverager: non-finite snapshots, swapping, and its state on disk."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from hf_wavg import EMA, LAWA, SWA, AveragerStateError, DecaySchedule, WeightAverager
from hf_wavg import state_io
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
    with pytest.raises(KeyError):
        with averager.swapped_in():
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


def _saved_averager(tmp_path):
    model = TiedLM()
    averager = WeightAverager(model, EMA(), parameters="all")
    perturb_(model)
    averager.update(1)
    averager.save(tmp_path)
    return averager


def test_state_of_another_model_names_the_first_mismatching_tensor(tmp_path):
    _saved_averager(tmp_path)
    other = WeightAverager(TiedLM(hidden=8), EMA(), parameters="all")
    with pytest.raises(AveragerStateError, match=r"'embed\.weight' has shape \(11, 6\) in the state but \(11, 8\)"):
        other.load(tmp_path)
    with pytest.raises(AveragerStateError, match="made by 'ema'"):
        WeightAverager(TiedLM(), SWA(), parameters="all").load(tmp_path)
    with pytest.raises(AveragerStateError, match="lacks tensor 'norm.running_mean'"):
        WeightAverager(TiedLM(), EMA(), parameters="all", buffers="average").load(tmp_path)


def tensor_files(directory):
    return [directory / entry["file"] for entry in state_io.read_record(directory)["files"]]


def test_missing_or_truncated_state_is_a_clear_error_and_changes_nothing(tmp_path):
    _saved_averager(tmp_path)
    target = WeightAverager(TiedLM(), EMA(), parameters="all")
    [tensors_file] = tensor_files(tmp_path)
    data = tensors_file.read_bytes()
    tensors_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(AveragerStateError, match="truncated"):
        target.load(tmp_path)
    assert target.num_updates == 0
    tensors_file.unlink()
    with pytest.raises(AveragerStateError, match="missing"):
        target.load(tmp_path)
    tensors_file.write_bytes(data)
    (tmp_path / state_io.META_FILE).write_text("{not json")
    with pytest.raises(AveragerStateError, match="not valid JSON"):
        target.load(tmp_path)


def test_crash_mid_save_leaves_the_previous_state_loadable(tmp_path, monkeypatch):
    first = _saved_averager(tmp_path)
    before = [t.clone() for t in first.strategy.average()]
    previous_files = sorted(os.listdir(tmp_path))
    perturb_(first.model, seed=5)
    first.update(2)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(state_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        first.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == previous_files  # no temp file left
    restored = WeightAverager(TiedLM(), EMA(), parameters="all")
    restored.load(tmp_path)
    for a, b in zip(restored.strategy.average(), before):
        assert torch.equal(a, b)

    # A successful save replaces the state and removes the files of the previous one.
    monkeypatch.undo()
    first.save(tmp_path)
    assert len(os.listdir(tmp_path)) == 2 and not set(os.listdir(tmp_path)) & set(previous_files) - {state_io.META_FILE}
    restored.load(tmp_path)
    assert restored.num_updates == 2
