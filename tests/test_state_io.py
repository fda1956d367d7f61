"""The averager's state on disk (state_io): damaged, missing, half-written or concurrent saves
are refused or survived with a clear message, and nothing a save did not write is deleted."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from hf_wavg import EMA, SWA, AveragerStateError, WAvgConfig, WeightAverager, state_io
from tests.models import TiedLM, perturb_


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
    (tmp_path / state_io.STATE_FILE).write_text("{not json")
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
    assert len(os.listdir(tmp_path)) == 2 and not set(os.listdir(tmp_path)) & set(previous_files) - {state_io.STATE_FILE}
    restored.load(tmp_path)
    assert restored.num_updates == 2


def _entry(directory):
    return state_io.read_record(directory)["files"][0]


def test_a_save_never_deletes_the_files_of_another_save_in_flight(tmp_path, monkeypatch):
    # Two averagers save into one folder; B saves whole while A's tensor file is on disk
    # without its record yet. Whichever record lands last must find all its files.
    a, b = _saved_averager(tmp_path / "a"), _saved_averager(tmp_path / "b")
    perturb_(b.model, seed=9)
    b.update(2)
    real_write_record = state_io.write_record

    def interleaved(directory, meta, files):
        monkeypatch.setattr(state_io, "write_record", real_write_record)
        b.save(directory)
        assert all((directory / entry["file"]).is_file() for entry in files), "B deleted A's fresh file"
        real_write_record(directory, meta, files)

    shared = tmp_path / "shared"
    monkeypatch.setattr(state_io, "write_record", interleaved)
    a.save(shared)
    restored = WeightAverager(TiedLM(), EMA(), parameters="all")
    restored.load(shared)
    for got, expected in zip(restored.strategy.average(), a.strategy.average()):
        assert torch.equal(got, expected)
    # A's record superseded B's: B's file went with it, nothing else is left behind.
    assert sorted(os.listdir(shared)) == sorted([state_io.STATE_FILE, _entry(shared)["file"]])


def test_orphans_of_a_dead_save_are_removed_by_the_next_save(tmp_path):
    averager = _saved_averager(tmp_path)
    orphan = tmp_path / state_io.tensor_file_name()
    orphan.write_bytes(b"left by a save that died before its record")
    os.utime(orphan, (0, 0))  # older than the record
    averager.save(tmp_path)
    assert not orphan.exists() and len(os.listdir(tmp_path)) == 2


def test_corrupted_bytes_and_damaged_records_are_refused_naming_the_file(tmp_path):
    averager = _saved_averager(tmp_path)
    target = WeightAverager(TiedLM(), EMA(), parameters="all")
    [tensors_file] = tensor_files(tmp_path)
    data = bytearray(tensors_file.read_bytes())
    data[-3] ^= 0xFF  # same size, one float changed
    tensors_file.write_bytes(bytes(data))
    with pytest.raises(AveragerStateError, match=rf"{tensors_file.name} does not match the SHA-256"):
        target.load(tmp_path)
    averager.save(tmp_path)

    meta_path = tmp_path / state_io.STATE_FILE
    good = json.loads(meta_path.read_text())
    for edit, message in [
        (lambda r: r["strategy"].update(num_updates=-3), "'strategy.num_updates' must be a count"),
        (lambda r: r.update(num_skipped="2"), "'num_skipped' must be a count"),
        (lambda r: r["files"][0].update(file="../../elsewhere.safetensors"), "does not name a state file"),
        (lambda r: r["files"][0]["ranges"].update({"embed.weight": [0, 10**9]}), "ranges outside"),
        (lambda r: r["files"][0].pop("sha256"), "lacks its size or checksum"),
    ]:
        damaged = json.loads(json.dumps(good))
        edit(damaged)
        meta_path.write_text(json.dumps(damaged))
        with pytest.raises(AveragerStateError, match=rf"{state_io.STATE_FILE} is damaged: .*{re.escape(message)}"):
            target.load(tmp_path)
        assert target.num_updates == 0


def test_a_non_finite_state_with_a_matching_checksum_is_refused(tmp_path):
    averager = _saved_averager(tmp_path)
    averager.strategy.average()[0][0, 0] = float("nan")  # as if corrupted before the save
    averager.save(tmp_path)
    with pytest.raises(AveragerStateError, match="holds NaN or inf"):
        WeightAverager(TiedLM(), EMA(), parameters="all").load(tmp_path)


def test_resuming_under_other_settings_is_refused_naming_them(tmp_path):
    model = TiedLM()
    saved = WAvgConfig(ema_decay=0.9, update_every=2, average_parameters="all").build_averager(model)
    perturb_(model)
    saved.update(1)
    saved.save(tmp_path)
    for change, named in [({"ema_decay": 0.99}, "decay 0.9 -> 0.99"), ({"ema_schedule": "power"}, "schedule"),
                          ({"update_every": 1}, "update_every 2 -> 1")]:
        settings = {"ema_decay": 0.9, "update_every": 2, "average_parameters": "all", **change}
        with pytest.raises(AveragerStateError, match=rf"other settings \(.*{named}"):
            WAvgConfig(**settings).build_averager(model).load(tmp_path)
    same = WAvgConfig(ema_decay=0.9, update_every=2, average_parameters="all").build_averager(model)
    same.load(tmp_path)
    assert same.num_updates == 1
