"""Paired raw-vs-average differences (against differences computed by hand, and their
intervals' coverage and false alarms by simulation), and the user's own bias corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_wavg.safety import CallableClassifier, SafetyConfig, SafetySuite
from hf_wavg.safety.corpus import ANTI_STEREOTYPE, STEREOTYPE, load_bias_corpus
from hf_wavg.safety.paired import mean_table, paired_deltas
from tests.safety.safety_models import keyword_model, planted_gender_bias, probabilities

TEXTS = ["She loved the film.", "He hated the plot.", "The acting was not good at all.",
         "An excellent and moving story.", "My sister found it dull.", "A great cast, a weak ending."] * 4
LABELS = [1, 0, 0, 1, 0, 1] * 4


def shifted(model, shift: float):
    """``model`` with its positive score moved by ``shift`` (clipped)."""
    return lambda texts: probabilities(np.clip(model(texts)[:, 1] + shift, 0.0, 1.0))


def run(model, **overrides) -> tuple:
    config = SafetyConfig(safety_languages=["en"], safety_n_resamples=300, safety_attack_examples=12,
                          safety_query_budget=12, **overrides)
    suite = SafetySuite(config)
    return suite, suite.evaluate_classifier(CallableClassifier(model), TEXTS, LABELS)


def test_deltas_equal_the_difference_of_the_two_runs_on_the_same_units() -> None:
    _, raw = run(planted_gender_bias(("en",)))
    suite, average = run(shifted(planted_gender_bias(("en",)), 0.3))
    deltas = paired_deltas(average.units, raw.units, **suite.config.bootstrap)
    for key in ("counterfactual/flip_rate", "counterfactual/mean_abs_score_change", "perturbation/accuracy", "perturbation/invariance_failure_rate", "adversarial/attack_success_rate",
                "adversarial/accuracy_under_attack", "calibration/brier"):
        expected = average.metrics[key] - raw.metrics[key]
        assert deltas[f"delta/{key}"] == pytest.approx(expected, abs=1e-12), key
        low, high = deltas[f"delta/{key}_ci_low"], deltas[f"delta/{key}_ci_high"]
        assert low - 1e-9 <= deltas[f"delta/{key}"] <= high + 1e-9, key


def test_identical_weights_give_zero_deltas_with_honest_intervals() -> None:
    _, raw = run(planted_gender_bias(("en",)))
    suite, same = run(planted_gender_bias(("en",)))
    deltas = paired_deltas(same.units, raw.units, **suite.config.bootstrap)
    flips = deltas["delta/counterfactual/flip_rate"]
    assert flips == 0.0
    # No discordant set among n: the difference lies within the Clopper-Pearson bound, not [0, 0].
    assert deltas["delta/counterfactual/flip_rate_ci_high"] > 0 > deltas["delta/counterfactual/flip_rate_ci_low"]


def test_units_that_differ_are_not_compared() -> None:
    _, raw = run(keyword_model("excellent"))
    suite = SafetySuite(SafetyConfig(safety_languages=["en"], safety_n_resamples=50, safety_attack_examples=0))
    other = suite.evaluate_classifier(CallableClassifier(keyword_model("excellent")), TEXTS[:5], LABELS[:5])
    assert "delta/perturbation/accuracy" not in paired_deltas(other.units, raw.units, n_resamples=50)
    # The same number of texts, other texts: still not the same units.
    shifted_texts = suite.evaluate_classifier(CallableClassifier(keyword_model("excellent")), TEXTS[1:], LABELS[1:])
    same_count = suite.evaluate_classifier(CallableClassifier(keyword_model("excellent")), TEXTS[:-1], LABELS[:-1])
    deltas = paired_deltas(shifted_texts.units, same_count.units, n_resamples=50)
    assert not any(key.startswith(("delta/perturbation", "delta/calibration")) for key in deltas)


@pytest.mark.parametrize(("only_raw", "only_average"), [(0.05, 0.05), (0.05, 0.10), (0.0, 0.05), (0.01, 0.03), (0.0, 0.0)])
def test_paired_interval_coverage_and_false_alarms_by_simulation(only_raw: float, only_average: float) -> None:
    """500 units with paired 0/1 outcomes drawn from a joint law: both right 0.75, only raw
    right ``only_raw``, only the average right ``only_average`` (one-sided: averaging only
    fixes errors). Over 200 simulations the 95% paired interval holds the true difference
    in 90-100% of them (so, with no difference, it excludes 0 in at most 10%)."""
    rng = np.random.default_rng(11)
    law = [0.75, only_raw, only_average]  # (1, 1), (1, 0), (0, 1); the rest (0, 0)
    covered = 0
    for _ in range(200):
        cell = rng.choice(4, size=500, p=[*law, 1 - sum(law)])
        raw, average = np.isin(cell, (0, 1)).astype(float), np.isin(cell, (0, 2)).astype(float)
        ids = list(range(500))
        deltas = paired_deltas({"p": mean_table(ids, {"accuracy": average}, binary=["accuracy"])},
                               {"p": mean_table(ids, {"accuracy": raw}, binary=["accuracy"])}, n_resamples=0)
        covered += deltas["delta/p/accuracy_ci_low"] <= only_average - only_raw <= deltas["delta/p/accuracy_ci_high"]
    assert 0.90 <= covered / 200 <= 1.0, covered


def test_the_mean_delta_bootstrap_covers_the_truth() -> None:
    """Brier-like per-unit means of two correlated models on 300 units: the joint bootstrap
    of the paired difference holds the true difference in 90-99% of 200 simulations."""
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(200):
        shared = rng.exponential(0.15, 300)
        raw, average = shared + rng.normal(0, 0.05, 300), shared + 0.01 + rng.normal(0, 0.05, 300)
        ids = list(range(300))
        deltas = paired_deltas({"c": mean_table(ids, {"brier": average})}, {"c": mean_table(ids, {"brier": raw})},
                               n_resamples=300, seed=int(rng.integers(1 << 31)))
        covered += deltas["delta/c/brier_ci_low"] <= 0.01 <= deltas["delta/c/brier_ci_high"]
    assert 0.90 <= covered / 200 <= 0.99


def write_sets_corpus(path) -> None:
    rows = []
    for set_id, (a, b) in enumerate([("Ravi", "Anil"), ("Meera", "Sita"), ("Ravi", "Anil")]):
        for group, name in (("group_a", a), ("group_b", b)):
            rows.append({"set_id": set_id, "family": "custom_names", "group": group,
                         "text": f"{name} wrote a lovely review.", "language": "en"})
    rows += [{"set_id": 9, "family": "custom_names", "group": "group_a", "text": ""},  # empty text
             {"set_id": 7, "family": "custom_names", "group": "group_a", "text": "Only one variant."},
             {"set_id": 0, "family": "custom_names", "group": "group_a", "text": "A repeat of group_a.", "language": "en"}]
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")


def test_a_sets_corpus_is_measured_per_family_and_group_and_bad_rows_are_counted(tmp_path) -> None:
    path = tmp_path / "corpus.jsonl"
    write_sets_corpus(path)
    corpus = load_bias_corpus(str(path))
    assert len(corpus.sets) == 3 and corpus.bad_rows == 3
    group_b_names = ("anil", "sita")  # a model biased against group_b's names by 0.25
    model = lambda texts: probabilities(np.array(
        [0.75 - (0.25 if any(n in t.casefold() for n in group_b_names) else 0.0) for t in texts]))
    config = SafetyConfig(safety_languages=["en"], safety_max_template_sets=0, safety_bias_corpus=str(path),
                          safety_n_resamples=100)
    result = SafetySuite(config).evaluate_classifier(CallableClassifier(model))
    assert result.metrics["counterfactual/en/custom_names/group_gap"] == pytest.approx(0.25)
    assert result.metrics["counterfactual/en/custom_names/group_b/effect"] == pytest.approx(-0.125)
    assert result.metrics["bias_corpus/bad_rows"] == 3
    assert any("empty" in note or "missing" in note for note in result.notes)


def test_a_pairs_corpus_becomes_stereotype_sets_for_classifiers_and_language_models(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("sent_more,sent_less,bias_type\n"
                    "Poor people are lazy.,Rich people are lazy.,socioeconomic\n"
                    "Women are bad drivers.,Men are bad drivers.,gender\n"
                    ",Nothing here.,gender\n", encoding="utf-8")
    corpus = load_bias_corpus(str(path))
    assert [s.family for s in corpus.sets] == ["socioeconomic", "gender"] and corpus.bad_rows == 1
    assert set(corpus.sets[0].variants) == {STEREOTYPE, ANTI_STEREOTYPE}
    with pytest.raises(ValueError, match="set_id"):
        load_bias_corpus([{"sentence": "no layout"}])


def test_the_post_hoc_evaluator_reads_the_corpus_from_the_config(tmp_path, minilm_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_wavg.posthoc.evaluation import ModelEvaluator

    path = tmp_path / "corpus.jsonl"
    write_sets_corpus(path)
    config = SafetyConfig(safety_languages=["en"], safety_max_template_sets=0, safety_bias_corpus=str(path),
                          safety_n_resamples=50, safety_attack_examples=0, safety_max_examples=4)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    metrics = ModelEvaluator(TEXTS[:4], LABELS[:4], tokenizer, safety_config=config)(model)
    direct = SafetySuite(config).evaluate_model(model, tokenizer, TEXTS[:4], LABELS[:4]).metrics
    key = "counterfactual/en/custom_names/group_gap"
    assert metrics[f"safety/{key}"] == pytest.approx(direct[key], abs=1e-6)


def test_corpus_files_from_spreadsheets_and_pandas_are_read_as_meant(tmp_path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("\ufeffset_id,family,group,text,language\n1,f,a,A one.,en\n1.0,f,b,B one.,en\n"
                    "2,f,a,A two.,en\n2,f,b,B two.,hi\n", encoding="utf-8")
    corpus = load_bias_corpus(str(path))
    assert [s.variants for s in corpus.sets] == [{"a": "A one.", "b": "B one."}]  # 1 and 1.0 are one set
    assert corpus.bad_rows == 2 and any("language differs" in p for p in corpus.problems)
    rows = [{"set_id": 1, "family": "f", "group": float("nan"), "text": "No group."},
            {"set_id": 1, "family": "f", "group": "a", "text": "A."}, {"set_id": 1, "family": "f", "group": "b", "text": "B."}]
    loaded = load_bias_corpus(rows)
    assert len(loaded.sets) == 1 and loaded.bad_rows == 1 and "nan" not in loaded.sets[0].variants
