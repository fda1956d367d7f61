"""The safety suite inside training: WAvgTrainer logs it for raw and averaged weights and
writes the report, plot and model-card table; the bare callback on a plain Trainer; the
logit-pairing loss; the causal-LM likelihood gap."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from hf_wavg import WAvgConfig
from hf_wavg.demo.sample_data import sample_rows
from hf_wavg.records import SAFETY_PLOT_FILE as PLOT_FILE
from hf_wavg.records import SAFETY_REPORT_FILE as REPORT_FILE
from hf_wavg.safety import SafetyConfig, SafetySuite
from hf_wavg.safety.classifiers import sequence_log_likelihoods
from tests.trainer_helpers import SMALL_SAFETY as SMALL
from tests.trainer_helpers import local_tokenizer, make_trainer, raw_state, safety_texts

pytestmark = pytest.mark.slow

class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_trainer_logs_safety_for_raw_and_average_and_writes_report_plot_and_card(tmp_path, minilm_path, capsys):
    recorder = LogRecorder()
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True), callbacks=[recorder],
                           eval_strategy="steps", eval_steps=4)
    trainer.wavg_callback.__init__(trainer.wavg_config, safety_config=SafetyConfig(**SMALL),
                                   safety_dataset=safety_texts(), tokenizer=trainer.processing_class)
    trainer.wavg_callback.log_fn = trainer.log_to_integrations
    trainer.safety_config = trainer.wavg_callback.safety_monitor.config
    trainer.train()

    safety_logs = [log for log in trainer.state.log_history if any(k.startswith("safety/") for k in log)]
    assert [log["step"] for log in safety_logs] == [4, 8]
    assert sum(any(k.startswith("safety/") for k in log) for log in recorder.logs) == 2  # reached the loggers
    for log in safety_logs:
        for weights in ("average", "raw"):
            assert 0.0 <= log[f"safety/{weights}/counterfactual/flip_rate"] <= 1.0
            assert f"safety/{weights}/calibration/brier_ci_high" in log
            assert f"safety/{weights}/perturbation/accuracy" in log
        # The paired difference is the difference of the two runs, with its interval.
        for key in ("calibration/brier", "counterfactual/mean_abs_score_change", "perturbation/accuracy"):
            delta = log[f"safety/average/{key}"] - log[f"safety/raw/{key}"]
            assert log[f"safety/delta/{key}"] == pytest.approx(delta, abs=1e-9)
            assert log[f"safety/delta/{key}_ci_low"] <= log[f"safety/delta/{key}"] + 1e-9
    console = capsys.readouterr().out
    assert console.count("hf_wavg safety at step") == 2 and "| Brier score" in console
    assert "'safety/raw/counterfactual/flip_rate'" not in console  # the loggers got the keys, not the console

    before = raw_state(trainer.model)
    metrics = trainer.evaluate()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert "safety/average/counterfactual/flip_rate" in metrics

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    report = json.loads((out / REPORT_FILE).read_text())
    assert [(e["step"], e["weights"]) for e in report["history"]] == [
        (4, "raw"), (4, "average"), (4, "delta"), (8, "raw"), (8, "average"), (8, "delta"),
        (8, "raw"), (8, "average"), (8, "delta")]
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Independent reference: the suite run directly on the reloaded averaged model.
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    texts = safety_texts()
    direct = SafetySuite(SafetyConfig(**SMALL)).evaluate_model(
        reloaded, AutoTokenizer.from_pretrained(minilm_path), texts["text"], texts["label"]).metrics
    latest = report["history"][-2]["metrics"]
    for key in ("counterfactual/flip_rate", "counterfactual/mean_abs_score_change", "calibration/ece",
                "perturbation/accuracy", "adversarial/attack_success_rate"):
        assert latest[key] == pytest.approx(direct[key], abs=1e-5), key

    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Safety evaluation" in card
    assert f"| Counterfactual flip rate | {latest['counterfactual/flip_rate']:.3f}" in card
    delta = report["history"][-1]["metrics"]["delta/calibration/brier"]
    assert f"| {delta:+.3f} [" in card


def test_logit_pairing_penalty_matches_a_hand_built_counterfactual(tmp_path, minilm_path):
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig())
    trainer.safety_config = SafetyConfig(safety_languages=["en"], safety_logit_pairing_weight=0.5)
    tokenizer = trainer.processing_class
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    texts = ["he loved this film", "the plot was dull", "she hated the ending"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    inputs["labels"] = torch.tensor([1, 0, 0])
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))

    # English gender has two groups, so each swap is determined: he <-> she.
    swapped = tokenizer(["she loved this film", "he hated the ending"], padding=True, truncation=True,
                        max_length=inputs["input_ids"].shape[1], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
        expected = outputs.loss + 0.5 * (outputs.logits[[0, 2]] - model(**swapped).logits).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the penalty is differentiable
    trainer.safety_config = SafetyConfig(safety_languages=["en"])
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(inputs)).item() == pytest.approx(outputs.loss.item(), rel=1e-5)


def test_causal_lm_likelihood_gap_matches_the_model_loss(tmp_path):
    corpus = [r["text"] for r in sample_rows(per_language=24, seed=3)]
    tokenizer = local_tokenizer(corpus + ["my brother my sister this man this woman he she"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = SafetySuite(SafetyConfig(safety_languages=["en"], safety_families=["gender"],
                                      safety_max_template_sets=100, safety_n_resamples=50)).evaluate_model(model, tokenizer)
    from hf_wavg.safety import load_lexicon, template_sets

    key = "likelihood/en/gender/male_vs_female"
    assert result.metrics[f"{key}/num_pairs"] == len(template_sets(load_lexicon("en"), ("gender",)))

    # Reference: per-token log-probabilities from one sentence at a time (BOS prepended, no
    # padding), summed over the tokens the two sentences share at their end.
    family = load_lexicon("en").families["gender"]
    terms = [t for group in family.groups.values() for t in group["any"]]

    def token_logps(text: str) -> tuple[list[int], np.ndarray, list[int]]:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        full = torch.tensor([[tokenizer.bos_token_id, *ids]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0, :-1].float(), -1)
        return ids, logp[torch.arange(len(ids)), torch.tensor(ids)].numpy(), [a for a, _ in encoded["offset_mapping"]]

    def shared_gap(a: str, b: str) -> float:
        # Every English gender template starts with the term: score the tokens after it.
        (ids_a, lp_a, starts_a), (ids_b, lp_b, starts_b) = token_logps(a), token_logps(b)
        term_a = next(t for t in terms if a.lower().startswith(t.lower() + " "))
        term_b = next(t for t in terms if b.lower().startswith(t.lower() + " "))
        after_a = sum(start >= len(term_a) for start in starts_a)
        after_b = sum(start >= len(term_b) for start in starts_b)
        assert ids_a[-after_a:] == ids_b[-after_b:]
        return float(lp_a[-after_a:].sum() - lp_b[-after_b:].sum())

    def log_likelihood(text: str) -> float:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            return -model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)

    sets = template_sets(load_lexicon("en"), ("gender",))
    gaps = np.array([shared_gap(s.variants["male"], s.variants["female"]) for s in sets])
    assert result.metrics[f"{key}/mean_gap"] == pytest.approx(gaps.mean(), abs=1e-4)
    assert result.metrics[f"{key}/preference_rate"] == pytest.approx((gaps > 0).mean())
    batched = sequence_log_likelihoods(model, tokenizer, [s.variants["male"] for s in sets], batch_size=5)
    assert batched == pytest.approx([log_likelihood(s.variants["male"]) for s in sets], abs=1e-4)
    random.seed(0)
