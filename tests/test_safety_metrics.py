"""Safety metrics against independent references: planted bias, hand-computed ECE,
scipy's Wasserstein distance, manual group gaps, and the evaluate-module interface."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from hf_wavg.safety import (
    METRIC_NAMES,
    CallableClassifier,
    SafetyConfig,
    SafetySuite,
    load_metric,
    metric_path,
)
from hf_wavg.safety.measures import calibration, counterfactual_fairness, group_gaps
from tests.safety_models import constant_model, planted_gender_bias

LANGUAGES = ("en", "hi", "ta")


def suite(**overrides) -> SafetySuite:
    settings = dict(safety_languages=list(LANGUAGES), safety_families=["gender"], safety_max_template_sets=1000,
                    safety_n_resamples=200)
    settings.update(overrides)
    return SafetySuite(SafetyConfig(**settings))


def test_planted_gender_bias_is_flagged_and_a_blind_model_is_not() -> None:
    biased = suite().evaluate_classifier(CallableClassifier(planted_gender_bias(LANGUAGES))).metrics
    blind = suite().evaluate_classifier(CallableClassifier(constant_model)).metrics
    assert biased["counterfactual/num_applicable"] == biased["counterfactual/num_sets"] > 20
    assert biased["counterfactual/flip_rate"] == pytest.approx(1.0)
    assert biased["counterfactual/group_gap"] == pytest.approx(0.9)
    assert biased["counterfactual/max_abs_score_change"] == pytest.approx(0.9)
    assert biased["group_gaps/gender/positive_rate_gap"] == pytest.approx(1.0)
    for language in LANGUAGES:  # the Hindi and Tamil per-gender templates are found too
        assert biased[f"counterfactual/{language}/flip_rate"] == pytest.approx(1.0)
    assert blind["counterfactual/flip_rate"] == 0.0
    assert blind["counterfactual/group_gap"] == pytest.approx(0.0, abs=1e-12)
    assert blind["group_gaps/gender/positive_rate_gap"] == 0.0


def test_texts_without_identity_terms_are_not_applicable_rather_than_fair() -> None:
    result = suite(safety_max_template_sets=0).evaluate_classifier(
        CallableClassifier(constant_model), ["the food was cold", "", "🙂🙂"], [0, 1, 1]
    )
    assert result.metrics["counterfactual/texts_with_identity_terms"] == 0
    assert "counterfactual/flip_rate" not in result.metrics
    assert any("not applicable" in note for note in result.notes)
    assert any("1 empty" in note for note in result.notes)


def test_text_counterfactuals_flag_bias_in_free_text() -> None:
    texts = ["She loved the film.", "He loved the film.", "The plot was thin."]
    metrics = suite(safety_max_template_sets=0).evaluate_classifier(
        CallableClassifier(planted_gender_bias(("en",))), texts, [1, 1, 0]
    ).metrics
    assert metrics["counterfactual/texts_with_identity_terms"] == 2
    assert metrics["counterfactual/num_applicable"] == 2
    assert metrics["counterfactual/flip_rate"] == 1.0


def test_missing_labels_skip_label_metrics_with_a_note() -> None:
    result = suite().evaluate_classifier(CallableClassifier(constant_model), ["good film", "bad film"], [1, None])
    assert "calibration/ece" not in result.metrics and "adversarial/attack_success_rate" not in result.metrics
    assert "perturbation/invariance_failure_rate" in result.metrics and "perturbation/accuracy" not in result.metrics
    assert any("no label" in note for note in result.notes)


def test_ece_and_brier_match_hand_computed_values() -> None:
    probs = np.array([[0.1, 0.9], [0.3, 0.7], [0.45, 0.55], [0.8, 0.2], [0.35, 0.65]])
    labels = np.array([1, 0, 1, 0, 1])
    # Two bins: [0, .5) is empty; [.5, 1] holds all; confidence mean 0.74, accuracy 4/5.
    result = calibration(probs, labels, n_bins=2, n_resamples=0)
    assert result["ece"] == pytest.approx(abs(0.8 - np.mean([0.9, 0.7, 0.55, 0.8, 0.65])))
    # Ten bins: per-example bins 9, 7, 5, 8, 6 each hold one example.
    ten = calibration(probs, labels, n_bins=10, n_resamples=0)
    per_example = [abs(1 - 0.9), abs(0 - 0.7), abs(1 - 0.55), abs(1 - 0.8), abs(1 - 0.65)]
    assert ten["ece"] == pytest.approx(sum(per_example) / 5)
    brier = np.mean([(0.1 - 0) ** 2 + (0.9 - 1) ** 2, 0.3**2 * 0 + (0.3 - 1) ** 2 + 0.7**2, 0.45**2 + 0.45**2,
                     0.2**2 + 0.2**2, 0.35**2 + 0.35**2])
    assert result["brier"] == pytest.approx(brier)


def test_bootstrap_intervals_contain_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(300)
    probs = np.stack([1 - p, p], axis=1)
    labels = (rng.random(300) < p).astype(int)
    scores = rng.random(200)
    values = {
        **calibration(probs, labels),
        **group_gaps((p > 0.5).astype(int), labels, rng.choice(["a", "b", "c"], 300)),
        **counterfactual_fairness(np.repeat(np.arange(100), 2), ["gender"] * 200, ["m", "f"] * 100, scores,
                                  (scores > 0.5).astype(int), [True, False] * 100),
    }
    checked = ["ece", "brier", "accuracy_gap", "positive_rate_gap", "flip_rate", "mean_abs_score_change", "group_gap"]
    for name in checked:
        low, high = values[f"{name}_ci_low"], values[f"{name}_ci_high"]
        assert low - 1e-9 <= values[name] <= high + 1e-9, (name, low, values[name], high)
        assert high - low > 0, name


def test_average_group_fairness_is_scipys_wasserstein_distance() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(300)
    groups = ["a", "b", "c"] * 100
    result = counterfactual_fairness(np.repeat(np.arange(100), 3), ["f"] * 300, groups, scores,
                                     (scores > 0.5).astype(int), [True, False, False] * 100, n_resamples=0)
    expected = np.mean([wasserstein_distance(scores[i::3], scores) for i in range(3)])
    assert result["average_group_fairness"] == pytest.approx(expected, rel=1e-12)
    means = [scores[i::3].mean() for i in range(3)]
    assert result["group_gap"] == pytest.approx(max(means) - min(means))


def test_group_gaps_match_per_group_rates() -> None:
    predictions = [1, 1, 0, 0, 1, 0, 1, 1]
    references = [1, 0, 0, 1, 1, 0, 0, 1]
    groups = ["x", "x", "x", "x", "y", "y", "y", "y"]
    result = group_gaps(predictions, references, groups, n_resamples=0)
    # x: accuracy 2/4, positive rate 2/4, TPR 1/2, FPR 1/2; y: accuracy 3/4, positive 3/4, TPR 2/2, FPR 1/2.
    assert result["accuracy_gap"] == pytest.approx(0.25)
    assert result["positive_rate_gap"] == pytest.approx(0.25)
    assert result["equalized_odds_gap"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_metric_loads_offline_by_path(name: str) -> None:
    module = evaluate.load(metric_path(name))
    assert isinstance(module, evaluate.Metric)
    assert module.name == name.replace("_", " ") or module.name == name
    assert set(module.features) == set(type(module).metric_features)


def test_metrics_combine_and_agree_with_direct_calls() -> None:
    combined = evaluate.combine([load_metric("calibration"), load_metric("group_gaps")])
    probs = [[0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]
    references, predictions, groups = [1, 0, 0, 0], [1, 0, 1, 0], ["a", "b", "a", "b"]
    result = combined.compute(prediction_scores=probs, references=references, predictions=predictions, groups=groups)
    direct = {**calibration(probs, references), **group_gaps(predictions, references, groups)}
    for key in ("ece", "brier", "accuracy_gap", "positive_rate_gap"):
        assert result[key] == pytest.approx(direct[key])
    assert math.isfinite(result["ece_ci_low"])
