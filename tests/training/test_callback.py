"""WAvgCallback on its own, on a plain Trainer: it resumes only from the checkpoint it is
told or can verify, and it adds the safety suite to evaluate()."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Trainer

from hf_wavg import AveragerStateError, WAvgCallback, WAvgConfig
from hf_wavg.records import SAFETY_REPORT_FILE as REPORT_FILE
from hf_wavg.safety import SafetyConfig
from tests.trainer_helpers import SMALL_SAFETY as SMALL
from tests.trainer_helpers import averaged_named, make_trainer, safety_texts

pytestmark = pytest.mark.slow
CHECKPOINTS = {"save_strategy": "steps", "save_steps": 4}


def test_the_bare_callback_refuses_to_guess_the_checkpoint_it_resumes_from(minilm_path, tmp_path):
    config = WAvgConfig(ema_decay=0.9)
    make_trainer(minilm_path, tmp_path / "a", config, **CHECKPOINTS).train()
    other = make_trainer(minilm_path, tmp_path / "b", config, learning_rate=1e-3, **CHECKPOINTS)
    other.train()  # another run's checkpoint-4 in the output folder
    resume = str(tmp_path / "a" / "checkpoint-4")

    plain = make_trainer(minilm_path, tmp_path / "b", trainer_cls=Trainer, callbacks=[WAvgCallback(config)],
                         **CHECKPOINTS)
    with pytest.raises(AveragerStateError, match="but not from .*b/checkpoint-4.*resume_from_checkpoint="):
        plain.train(resume_from_checkpoint=resume)

    # Resumed from a folder outside the output folder, where nothing is to be guessed: the way out
    # names the argument that keeps the average before the one that starts a new one.
    elsewhere = make_trainer(minilm_path, tmp_path / "e", trainer_cls=Trainer, callbacks=[WAvgCallback(config)],
                             **CHECKPOINTS)
    with pytest.raises(AveragerStateError, match=r"holds no averager state .*: if the Trainer resumed from another "
                       r"folder, pass it as WAvgCallback\(resume_from_checkpoint=\.\.\.\); else pass "
                       r"WAvgConfig\(restart_average_on_resume=True\)"):
        elsewhere.train(resume_from_checkpoint=resume)

    told = WAvgCallback(config, resume_from_checkpoint=resume)
    plain = make_trainer(minilm_path, tmp_path / "c", trainer_cls=Trainer, callbacks=[told], **CHECKPOINTS)
    plain.train(resume_from_checkpoint=resume)
    reference = make_trainer(minilm_path, tmp_path / "d", config, **CHECKPOINTS)
    reference.train(resume_from_checkpoint=resume)
    for name, value in averaged_named(reference.averager).items():
        assert torch.equal(averaged_named(told.averager)[name], value), name


def test_bare_callback_on_a_plain_trainer_adds_safety_to_evaluate(tmp_path, minilm_path):
    callback = WAvgCallback(WAvgConfig(), safety_config=SafetyConfig(**SMALL), safety_dataset=safety_texts())
    trainer = make_trainer(minilm_path, tmp_path / "run", trainer_cls=Trainer, callbacks=[callback], max_steps=4)
    trainer.train()
    metrics = trainer.evaluate()
    assert "safety/average/counterfactual/flip_rate" in metrics
    assert any("safety/average/calibration/brier" in log for log in trainer.state.log_history)
    assert (tmp_path / "run" / REPORT_FILE).is_file()


def test_post_hoc_ema_without_checkpoints_is_warned_about(minilm_path, tmp_path, caplog):
    config = WAvgConfig(method="posthoc_ema")
    with caplog.at_level(logging.WARNING, logger="hf_wavg"):
        make_trainer(minilm_path, tmp_path / "none", config, max_steps=2, save_strategy="no").train()
    assert "saves none (save_strategy='no')" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wavg"):
        make_trainer(minilm_path, tmp_path / "some", config, max_steps=2, **CHECKPOINTS).train()
    assert "saves none" not in caplog.text
