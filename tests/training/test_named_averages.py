"""Several named averages in one WAvgTrainer run (a one-layer BERT from a config, for speed): each equals the same average kept alone,
each is evaluated, the selected one is saved and carded, all resume, and each safety run is
paired with the same raw weights."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_wavg import WAvgConfig
from hf_wavg.callback_group import check_named_configs
from hf_wavg.card_results import eval_results
from hf_wavg.records import AVERAGES_DIR, AVERAGING_FILE, SAFETY_REPORT_FILE, STATE_FILE, named_file
from hf_wavg.safety import SafetyConfig, SafetySuite
from hf_wavg.state_io import load_state
from tests.trainer_helpers import SMALL_SAFETY, averaged_named, make_trainer, raw_state, safety_texts

pytestmark = pytest.mark.slow

CONFIGS = {"ema": WAvgConfig(ema_decay=0.9, evaluate_raw=True), "swa": WAvgConfig(method="swa", evaluate_raw=True)}


def test_named_averages_equal_single_runs_and_the_selected_one_is_evaluated_saved_and_carded(
        minilm_path, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="transformers"):
        trainer = make_trainer(minilm_path, tmp_path / "run", CONFIGS, wavg_selection="swa")
    assert "there is already one" not in caplog.text
    trainer.train()
    alone = {}
    for name, config in CONFIGS.items():
        alone[name] = make_trainer(minilm_path, tmp_path / name, config)
        alone[name].train()
        # The same snapshots, the same arithmetic: bit for bit the average kept alone.
        for key, value in averaged_named(alone[name].averager).items():
            assert torch.equal(averaged_named(trainer.wavg_callback_of(name).averager)[key], value), (name, key)

    before = raw_state(trainer.model)
    metrics = trainer.evaluate()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    single = {name: alone[name].evaluate() for name in CONFIGS}
    assert metrics["eval_ema_loss"] == pytest.approx(single["ema"]["eval_loss"], rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(single["swa"]["eval_loss"], rel=1e-6)  # the selected one
    assert metrics["eval_raw_loss"] == pytest.approx(single["swa"]["eval_raw_loss"], rel=1e-6)
    assert "eval_swa_loss" not in metrics  # evaluated once, as eval_*

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    saved = load_file(out / "model.safetensors")
    torch.testing.assert_close(saved["classifier.weight"], averaged_named(alone["swa"].averager)["classifier.weight"],
                               rtol=0, atol=0)
    summary = json.loads((out / AVERAGING_FILE).read_text())
    assert summary["selected"] == "swa" and summary["config"]["method"] == "swa"
    assert summary["averages"]["ema"]["metrics"]["loss"] == metrics["eval_ema_loss"]
    assert summary["averages"]["swa"]["metrics"]["loss"] == metrics["eval_loss"]
    assert not any(key.startswith("eval_ema_") for key in summary["last_evaluation"])
    # The Hub's evaluation results are the saved weights' alone: the selected average's loss.
    results = eval_results(out)
    assert [(r.metric_type, r.metric_value) for r in results] == [("loss", metrics["eval_loss"])]

    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "run" / "README.md").text
    rows = {line.split(" | ")[0].strip("| *"): line for line in card.splitlines() if line.startswith("| ")}
    assert "Averages kept side by side" in card and "| **swa** | swa |" in card
    assert f"{metrics['eval_ema_loss']:.4f}" in rows["ema"] and f"{metrics['eval_loss']:.4f}" in rows["swa"]
    assert f"{metrics['eval_raw_loss']:.4f}" in rows["raw weights"]


def test_best_selection_follows_metric_for_best_model_and_the_loaded_best_checkpoint(minilm_path, tmp_path):
    configs = {"fast": WAvgConfig(ema_decay=0.5), "slow": WAvgConfig(method="swa"), "late": WAvgConfig(method="swa",
               start_step=6)}
    trainer = make_trainer(minilm_path, tmp_path / "run", configs, wavg_selection="best", max_steps=12,
                           eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                           load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best_step = trainer.state.best_global_step
    logged = {k: v for log in trainer.state.log_history if log.get("step") == best_step for k, v in log.items()}
    # An average with no snapshot yet ("late" before step 6) is no candidate.
    losses = {name: logged[f"eval_{name}_loss"] for name in configs if f"eval_{name}_loss" in logged}
    assert trainer.selected_average() == min(losses, key=losses.get)
    assert logged["eval_loss"] == pytest.approx(min(losses.values()), rel=1e-6)
    # Every average came back with the best checkpoint's raw weights.
    for name in configs:
        saved, _ = load_state(f"{trainer.state.best_model_checkpoint}/{AVERAGES_DIR}/{name}")
        for key, value in averaged_named(trainer.wavg_callback_of(name).averager).items():
            assert torch.equal(value, saved[f"average::{key}"]), (name, key)

    trainer.save_model(str(tmp_path / "saved"))
    summary = json.loads((tmp_path / "saved" / AVERAGING_FILE).read_text())
    assert summary["selected"] == trainer.selected_average()
    assert summary["config"]["method"] == configs[trainer.selected_average()].method

    # At each evaluation the pick is the argmin (argmax when greater is better) of the scores.
    metrics = trainer.evaluate()
    scores = {name: metrics[f"eval_{name}_loss"] for name in configs if f"eval_{name}_loss" in metrics}
    assert len(scores) >= 2
    assert metrics["eval_loss"] == pytest.approx(min(scores.values()), rel=1e-6)
    trainer.args.greater_is_better = True
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(max(scores.values()), rel=1e-6)


def test_every_named_average_resumes_bit_for_bit(minilm_path, tmp_path):
    args = {"save_strategy": "steps", "save_steps": 4}
    full = make_trainer(minilm_path, tmp_path / "full", CONFIGS, **args)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    for name in CONFIGS:
        assert (checkpoint / AVERAGES_DIR / name / STATE_FILE).is_file()
    assert not (checkpoint / STATE_FILE).exists()

    resumed = make_trainer(minilm_path, tmp_path / "resumed", CONFIGS, **args)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name in CONFIGS:
        full_average = averaged_named(full.wavg_callback_of(name).averager)
        resumed_average = averaged_named(resumed.wavg_callback_of(name).averager)
        assert resumed.wavg_callback_of(name).averager.num_updates == 8
        assert all(torch.equal(resumed_average[k], v) for k, v in full_average.items()), name

    # A checkpoint missing one average's state is not a resumable one.
    shutil.rmtree(tmp_path / "full" / "checkpoint-8" / AVERAGES_DIR / "ema")
    assert full._last_resumable_checkpoint() == str(checkpoint)


def test_each_named_average_gets_its_safety_run_paired_with_the_same_raw_weights(minilm_path, tmp_path, monkeypatch):
    trainer = make_trainer(minilm_path, tmp_path / "run", CONFIGS, wavg_selection="ema",
                           safety_config=SafetyConfig(**SMALL_SAFETY), safety_dataset=safety_texts())
    trainer.train()
    runs = []
    measure = SafetySuite.evaluate_model
    monkeypatch.setattr(SafetySuite, "evaluate_model", lambda suite, *a, **k: runs.append(1) or measure(suite, *a, **k))
    metrics = trainer.evaluate()
    assert len(runs) == len(CONFIGS) + 1  # the raw weights measured once for every average
    monkeypatch.undo()
    # ... and that one measurement is the raw weights', as a suite of its own measures them.
    texts = safety_texts()
    alone = SafetySuite(SafetyConfig(**SMALL_SAFETY)).evaluate_model(trainer.model, trainer.processing_class,
                                                                      texts["text"], texts["label"])
    shared = [key for key in alone.metrics if f"safety/ema/raw/{key}" in metrics and not key.endswith("seconds")]
    assert len(shared) > 10
    assert {key: metrics[f"safety/ema/raw/{key}"] for key in shared} == pytest.approx(
        {key: alone.metrics[key] for key in shared}, abs=1e-12, nan_ok=True)
    for name in CONFIGS:
        key = "calibration/brier"
        difference = metrics[f"safety/{name}/average/{key}"] - metrics[f"safety/{name}/raw/{key}"]
        assert metrics[f"safety/{name}/delta/{key}"] == pytest.approx(difference, abs=1e-9)
        assert (tmp_path / "run" / named_file(SAFETY_REPORT_FILE, name)).is_file()
    # The same raw weights, texts and attacks for both: the raw measurements agree.
    raw = {k.removeprefix("safety/ema/raw/"): v for k, v in metrics.items()
           if k.startswith("safety/ema/raw/") and not k.endswith("seconds")}
    assert len(raw) > 10
    assert {k: metrics[f"safety/swa/raw/{k}"] for k in raw} == pytest.approx(raw, abs=1e-12)
    assert metrics["safety/ema/average/calibration/brier"] != metrics["safety/swa/average/calibration/brier"]

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    report = json.loads((out / SAFETY_REPORT_FILE).read_text())
    assert report == json.loads((out / named_file(SAFETY_REPORT_FILE, "ema")).read_text())
    summary = json.loads((out / AVERAGING_FILE).read_text())
    delta = summary["averages"]["swa"]["safety_delta"]["calibration/brier"]
    assert delta["value"] == pytest.approx(metrics["safety/swa/delta/calibration/brier"])
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    swa_row = next(line for line in card.splitlines() if line.startswith("| swa | swa |"))
    assert "Brier score (summed over classes): average − raw" in card and "| runtime |" not in card
    assert f"{delta['value']:+.3f} [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]" in swa_row


@pytest.mark.parametrize("every", [0, 4])
def test_a_callback_group_on_a_plain_trainer_measures_the_raw_weights_once_per_round(minilm_path, tmp_path,
                                                                                    monkeypatch, every):
    from transformers import Trainer

    from hf_wavg import WAvgCallbacks

    # Two EMAs update at every step, so with safety_every_updates both run the suite at steps 4 and 8.
    configs = {"fast": WAvgConfig(ema_decay=0.5, evaluate_raw=True), "slow": WAvgConfig(ema_decay=0.9, evaluate_raw=True)}
    group = WAvgCallbacks(configs, SafetyConfig(**SMALL_SAFETY, safety_every_updates=every), safety_texts())
    trainer = make_trainer(minilm_path, tmp_path / "run", trainer_cls=Trainer, callbacks=[group])
    runs = []
    measure = SafetySuite.evaluate_model
    monkeypatch.setattr(SafetySuite, "evaluate_model", lambda suite, *a, **k: runs.append(1) or measure(suite, *a, **k))
    trainer.train()
    if not every:
        trainer.evaluate()
    rounds = 2 if every else 1
    assert len(runs) == rounds * (len(configs) + 1)  # each round: one raw measurement, one per average
    entries = [entry for entry in trainer.state.log_history if "safety/fast/raw/calibration/brier" in entry
               or "safety/slow/raw/calibration/brier" in entry]
    assert len(entries) == rounds * len(configs)
    for fast, slow in zip(entries[::2], entries[1::2]):
        assert fast["step"] == slow["step"]
        raw = {key.removeprefix("safety/fast/raw/"): value for key, value in fast.items()
               if key.startswith("safety/fast/raw/") and not key.endswith("seconds")}
        assert len(raw) > 10
        assert {key: slow[f"safety/slow/raw/{key}"] for key in raw} == pytest.approx(raw, abs=0, nan_ok=True)
        for name, entry in (("fast", fast), ("slow", slow)):
            key = "calibration/brier"
            difference = entry[f"safety/{name}/average/{key}"] - entry[f"safety/{name}/raw/{key}"]
            assert entry[f"safety/{name}/delta/{key}"] == pytest.approx(difference, abs=1e-9)
    # The shared measurement is the raw weights' own: a suite of its own, on the trained model, agrees.
    texts = safety_texts()
    alone = SafetySuite(SafetyConfig(**SMALL_SAFETY)).evaluate_model(trainer.model, trainer.processing_class,
                                                                      texts["text"], texts["label"])
    last = entries[-1]
    shared = [key for key in alone.metrics if f"safety/slow/raw/{key}" in last and not key.endswith("seconds")]
    assert len(shared) > 10
    assert {key: last[f"safety/slow/raw/{key}"] for key in shared} == pytest.approx(
        {key: alone.metrics[key] for key in shared}, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("configs, message", [
    ({}, "at least one"),
    ({"raw": WAvgConfig()}, "letters, digits and hyphens"),
    ({"my_ema": WAvgConfig()}, "letters, digits and hyphens"),
    ({"a": WAvgConfig(), "b": WAvgConfig(refine_every_epochs=1)}, "refine_every_epochs writes the average"),
    ({"a": WAvgConfig(), "b": WAvgConfig(evaluate_raw=True)}, "evaluate_raw is a setting of the run"),
])
def test_named_configs_that_cannot_share_a_run_are_refused(configs, message):
    with pytest.raises(ValueError, match=message):
        check_named_configs(configs)


def test_selection_must_name_an_average_or_have_a_metric(minilm_path, tmp_path):
    with pytest.raises(ValueError, match="none of the averages"):
        make_trainer(minilm_path, tmp_path / "a", CONFIGS, wavg_selection="lawa")
    with pytest.raises(ValueError, match="set it in TrainingArguments"):
        make_trainer(minilm_path, tmp_path / "b", CONFIGS, wavg_selection="best")
    with pytest.raises(ValueError, match="dict of them"):
        make_trainer(minilm_path, tmp_path / "c", WAvgConfig(), wavg_selection="ema")
