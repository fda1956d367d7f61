"""WAvgTrainer end to end on the embedded pretrained MiniLM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, EarlyStoppingCallback, Trainer

from hf_wavg import AveragerStateError, DecaySchedule, WAvgCallback, WAvgConfig
from hf_wavg.averaging.methods import METHODS
from hf_wavg.state_io import load_state
from tests.reference import assert_close_to_reference, ema_reference, mean_reference
from tests.trainer_helpers import SnapshotRecorder, averaged_named, make_trainer, raw_state

pytestmark = pytest.mark.slow


def test_average_saved_model_and_evaluation_match_independent_references(minilm_path, tmp_path):
    config = WAvgConfig(ema_decay=0.9, update_every=2, evaluate_raw=True)
    recorder = SnapshotRecorder()
    trainer = make_trainer(minilm_path, tmp_path / "run", config, callbacks=[recorder])
    trainer.train()

    # The average equals the formula applied to the recorded snapshots (steps 2, 4, 6, 8).
    folded = [recorder.steps[s] for s in (2, 4, 6, 8)]
    names = trainer.averager.selection.names
    expected = ema_reference([[snap[n] for n in names] for snap in folded], DecaySchedule(0.9, "rational"))
    assert trainer.averager.num_updates == 4
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)

    # Evaluating the average leaves the raw weights untouched, bit for bit.
    before = raw_state(trainer.model)
    metrics = trainer.evaluate()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key

    # The saved model is the average: it reloads and reproduces the averaged model's logits.
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad(), trainer.averaged_weights() as averaged:
        averaged_logits = averaged(**inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, averaged_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(trainer.model(**inputs).logits, averaged_logits, atol=1e-4)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    torch.testing.assert_close(saved["classifier.weight"].double(), expected[names.index("classifier.weight")])

    # eval_* are the averaged model's metrics and eval_raw_* the raw model's, each equal
    # to what a plain Trainer reports for that model.
    plain = Trainer(model=reloaded, args=trainer.args, eval_dataset=trainer.eval_dataset,
                    data_collator=trainer.data_collator)
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-5)
    plain_raw = Trainer(model=trainer.model, args=trainer.args, eval_dataset=trainer.eval_dataset,
                        data_collator=trainer.data_collator)
    assert metrics["eval_raw_loss"] == pytest.approx(plain_raw.evaluate()["eval_loss"], rel=1e-5)

    # The model card says how the weights were averaged.
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Weight averaging (hf_wavg)" in card and "| num_updates | 4 |" in card
    # ... and what it spans: steps 2-8, 1/(1-decay) of the last update (rational warm-up: 4/13).
    assert "| steps averaged | 2-8 of 8 |" in card
    window = json.loads((tmp_path / "saved" / "wavg_averaging.json").read_text())["window"]
    assert window["effective_window_steps"] == pytest.approx(2 / (1 - 4 / 13), abs=0.01)


RESUME_SETTINGS = {"ema": {"ema_decay": 0.9}, "lawa": {"lawa_k": 3}, "bema": {"bema_lag": 2.0},
                   "posthoc_ema": {"posthoc_ema_sigma_rels": [0.05, 0.2]}}


def test_every_registered_method_has_a_resume_test():
    assert set(RESUME_SETTINGS) | {"swa"} == set(METHODS)  # SWA is EMA's running mean with another weight


@pytest.mark.parametrize("method", sorted(RESUME_SETTINGS))
def test_resume_from_mid_run_checkpoint_gives_the_uninterrupted_average(minilm_path, tmp_path, method):
    config = WAvgConfig(method=method, **RESUME_SETTINGS[method])
    args = {"save_strategy": "steps", "save_steps": 4}
    full = make_trainer(minilm_path, tmp_path / "full", config, **args)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "wavg_state.json").is_file()

    resumed = make_trainer(minilm_path, tmp_path / "resumed", config, **args)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.averager.num_updates == full.averager.num_updates == 8
    for name, value in averaged_named(full.averager).items():  # bit for bit, LAWA's ring order included
        assert torch.equal(averaged_named(resumed.averager)[name], value), name

    # The bare callback on a plain Trainer finds the state in <output_dir>/checkpoint-<step>.
    shutil.copytree(checkpoint, tmp_path / "plain" / "checkpoint-4")
    callback = WAvgCallback(config)
    plain = make_trainer(minilm_path, tmp_path / "plain", trainer_cls=Trainer, callbacks=[callback], **args)
    plain.train(resume_from_checkpoint=True)
    for name, value in averaged_named(full.averager).items():
        assert torch.equal(averaged_named(callback.averager)[name], value), name


def test_resume_without_averager_state_is_refused_unless_restart_is_asked(minilm_path, tmp_path):
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        make_trainer(minilm_path, tmp_path / "empty", WAvgConfig()).train(resume_from_checkpoint=True)
    args = {"save_strategy": "steps", "save_steps": 4}
    make_trainer(minilm_path, tmp_path / "full", WAvgConfig(), **args).train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    (checkpoint / "wavg_state.json").unlink()
    with pytest.raises(AveragerStateError, match="holds no averager state"):
        make_trainer(minilm_path, tmp_path / "b", WAvgConfig(), **args).train(resume_from_checkpoint=str(checkpoint))
    restarted = make_trainer(minilm_path, tmp_path / "c", WAvgConfig(restart_average_on_resume=True), **args)
    restarted.train(resume_from_checkpoint=str(checkpoint))
    assert restarted.averager.num_updates == 4  # steps 5..8 only


def test_load_best_model_at_end_and_early_stopping_use_the_average(minilm_path, tmp_path):
    stop = EarlyStoppingCallback(early_stopping_patience=1)
    trainer = make_trainer(
        minilm_path, tmp_path / "run", WAvgConfig(method="swa"), callbacks=[stop],
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, max_steps=40,
        load_best_model_at_end=True, metric_for_best_model="eval_constant", greater_is_better=True,
        compute_metrics=lambda prediction: {"constant": 1.0},
    )
    trainer.train()
    # Evaluation at step 2 is the best; at step 4 nothing improved: early stop.
    assert trainer.state.global_step == 4
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    saved_average, _ = load_state(best)
    for name, value in averaged_named(trainer.averager).items():
        assert torch.equal(value, saved_average[f"average::{name}"])
    raw_best = load_file(f"{best}/model.safetensors")
    assert torch.equal(trainer.model.state_dict()["classifier.weight"], raw_best["classifier.weight"])


def test_gradient_accumulation_folds_once_per_optimizer_step(minilm_path, tmp_path):
    recorder = SnapshotRecorder()
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="swa"), callbacks=[recorder],
                           gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=3)
    trainer.train()
    assert trainer.averager.num_updates == 3 == len(recorder.steps)
    names = trainer.averager.selection.names
    expected = mean_reference([[recorder.steps[s][n] for n in names] for s in (1, 2, 3)])
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)


def test_refine_every_epoch_and_load_average_at_end(minilm_path, tmp_path):
    class EpochEndProbe(SnapshotRecorder):
        def __init__(self, trainer):
            super().__init__()
            self.trainer, self.matches = trainer, []

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            average = averaged_named(self.trainer.averager)
            self.matches.append(all(torch.equal(p, average[n]) for n, p in model.named_parameters() if n in average))

    config = WAvgConfig(method="swa", refine_every_epochs=1, load_average_at_end=True)
    trainer = make_trainer(minilm_path, tmp_path / "run", config, max_steps=-1, num_train_epochs=2)
    probe = EpochEndProbe(trainer)
    trainer.add_callback(probe)  # runs after WAvgCallback
    trainer.train()
    assert probe.matches == [True, True]
    average = averaged_named(trainer.averager)
    assert all(torch.equal(p, average[n]) for n, p in trainer.model.named_parameters() if n in average)
