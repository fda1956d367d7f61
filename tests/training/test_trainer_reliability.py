"""WAvgTrainer and WAvgCallback never hand back the wrong weights silently: a second
train(), a resume from another folder, a run with no average, predict(), and an
interrupted checkpoint."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_wavg import WAvgConfig
from hf_wavg.records import AVERAGING_FILE
from hf_wavg.state_io import load_state
from tests.trainer_helpers import averaged_named, make_trainer

pytestmark = pytest.mark.slow
CHECKPOINTS = {"save_strategy": "steps", "save_steps": 4}


def assert_state_holds(checkpoint, averager):
    saved, _ = load_state(checkpoint)
    for name, value in averaged_named(averager).items():
        assert torch.equal(saved[f"average::{name}"], value), name


def test_a_second_train_call_saves_its_own_average(minilm_path, tmp_path):
    # Re-running a notebook cell: the second run's step-4 checkpoint must hold its own
    # average, not the first run's next to the second run's raw weights.
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(), max_steps=4, **CHECKPOINTS)
    trainer.train()
    first = {name: value.clone() for name, value in averaged_named(trainer.averager).items()}
    trainer.train()
    assert any(not torch.equal(first[n], v) for n, v in averaged_named(trainer.averager).items())
    assert_state_holds(tmp_path / "run" / "checkpoint-4", trainer.averager)


def test_a_run_with_no_average_says_so_everywhere_and_never_saves_non_finite_weights(minilm_path, tmp_path, caplog):
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(start_step=100), max_steps=4)
    trainer.train()
    assert not trainer.averager.has_average
    with caplog.at_level(logging.WARNING, logger="hf_wavg.trainer"):
        trainer.evaluate()
        trainer.save_model(str(tmp_path / "saved"))
    warnings = [r.getMessage() for r in caplog.records if "NO AVERAGE" in r.getMessage()]
    assert any("eval_* metrics are the raw weights'" in w for w in warnings)
    assert any("save_model() writes the raw weights" in w and "first step to average (step 100" in w
               for w in warnings)
    record = json.loads((tmp_path / "saved" / AVERAGING_FILE).read_text())
    assert record["averaged"] is False and "step 100" in record["not_averaged_because"]
    trainer.create_model_card()
    assert "**These weights are not an average**" in (tmp_path / "run" / "README.md").read_text()

    with torch.no_grad():
        trainer.model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or inf; refusing"):
        trainer.save_model(str(tmp_path / "nan"))
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_predict_uses_the_average_unless_told_otherwise(minilm_path, tmp_path):
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="swa"))
    trainer.train()
    averaged = trainer.predict(trainer.eval_dataset).predictions
    with trainer.averaged_weights():
        reference = trainer.evaluation_loop(trainer.get_eval_dataloader(), "reference").predictions
    raw = trainer.evaluation_loop(trainer.get_eval_dataloader(), "reference").predictions
    assert (averaged == reference).all() and not (averaged == raw).all()
    trainer.wavg_config.predict_average = False
    assert (trainer.predict(trainer.eval_dataset).predictions == raw).all()


def test_resume_passes_over_a_checkpoint_whose_trainer_state_was_cut_short(minilm_path, tmp_path, caplog):
    full = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(), max_steps=8, **CHECKPOINTS)
    full.train()
    state_file = tmp_path / "run" / "checkpoint-8" / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:100])  # killed while the Trainer wrote its state
    resumed = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(), max_steps=8, **CHECKPOINTS)
    with caplog.at_level(logging.WARNING, logger="hf_wavg.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert any("checkpoint-8 has no readable trainer_state.json" in r.getMessage() for r in caplog.records)
    for name, value in averaged_named(full.averager).items():  # resumed from checkpoint-4, bit for bit
        assert torch.equal(averaged_named(resumed.averager)[name], value), name
