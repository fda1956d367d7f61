"""Safety metrics against independent references and synthetic models with known behaviour:
a model that ignores identity scores 0 in every language and family, a planted effect is
found where it was planted at its size, and the tests' and intervals' error rates are
measured by simulation."""

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
    available_languages,
    load_lexicon,
    load_metric,
    metric_path,
    template_sets,
)
from hf_wavg.safety.classifiers import ScoredText, shared_suffix_log_likelihoods
from hf_wavg.safety.languages import script_of
from hf_wavg.safety.measures import (
    calibration,
    counterfactual_fairness,
    group_gaps,
    likelihood_gap,
)
from tests.safety.safety_models import constant_model, planted_gender_bias, probabilities

LANGUAGES = ("en", "hi", "ta")
FAST = {"safety_n_resamples": 200}


def suite(**overrides) -> SafetySuite:
    settings = dict(safety_languages=list(LANGUAGES), safety_families=["gender"], **FAST)
    settings.update(overrides)
    return SafetySuite(SafetyConfig(**settings))


def cell_keys(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Per-(language, family) values of ``name``: counterfactual/<language>/<family>/<name>."""
    return {key: value for key, value in metrics.items()
            if key.startswith("counterfactual/") and key.count("/") == 3 and key.endswith(f"/{name}")}


def script_model(texts: list[str]) -> np.ndarray:
    """Scores that depend only on the script: it ignores identity terms entirely."""
    by_script = {"LATIN": 0.9, "DEVANAGARI": 0.3, "TAMIL": 0.45, "TELUGU": 0.7, "BENGALI": 0.2, "ARABIC": 0.6}
    return probabilities(np.array([by_script.get(script_of(text) or "", 0.5) for text in texts]))


def template_label_model(full: SafetySuite):
    """Right on every template: the score is the template's label, whatever the group."""
    labels = {text: s.label for s in full.sampled_template_sets for text in s.variants.values()}
    return lambda texts: probabilities(np.array([0.95 if labels.get(t) == 1 else 0.05 for t in texts]))


def all_languages_suite(**overrides) -> SafetySuite:
    return SafetySuite(SafetyConfig(safety_languages=None, **{**FAST, **overrides}))


HINDI_AND_MARATHI_TEXTS = ["राहुल ने कहा कि खाना अच्छा था और मैं खुश हूँ।", "इमरान की फ़िल्म बहुत अच्छी थी।",
                           "He said his sister was right.", "राहुल म्हणाला की जेवण चांगले आहे आणि मी खूश आहे."]


@pytest.mark.parametrize("model", ["script", "template_labels"])
def test_a_model_that_ignores_identity_scores_zero_in_every_language_and_family(model: str) -> None:
    full = all_languages_suite()
    classifier = CallableClassifier(script_model if model == "script" else template_label_model(full))
    metrics = full.evaluate_classifier(classifier, HINDI_AND_MARATHI_TEXTS, [1, 1, 1, 1]).metrics
    cells = cell_keys(metrics, "group_gap")
    languages = {key.split("/")[1] for key in cells}
    assert languages == set(available_languages())
    assert len(cells) >= 4 * len(languages)  # every family of every language
    for name in ("group_gap", "group_gap_debiased", "positive_rate_gap", "flip_rate", "average_group_fairness"):
        values = cell_keys(metrics, name)
        assert values and all(value == 0.0 for value in values.values() if not math.isnan(value)), name
    assert all(value == 1.0 for value in cell_keys(metrics, "group_test_p_value").values() if not math.isnan(value))
    assert metrics["counterfactual/flip_rate"] == 0.0
    assert metrics["counterfactual/flip_rate_ci_high"] > 0  # zero flips is not certainty
    assert metrics["counterfactual/num_cells_holm"] == 0.0 and metrics["counterfactual/group_gap_holm"] == 0.0
    assert metrics["counterfactual/group_test_p_value"] == 1.0
    assert metrics["counterfactual/term_sensitivity_p_value"] == 1.0


def test_each_text_is_matched_with_its_own_languages_lexicon_only() -> None:
    full = all_languages_suite()
    sets = full.text_sets(HINDI_AND_MARATHI_TEXTS)
    by_text = {s.text_index: {x.language for x in sets if x.text_index == s.text_index} for s in sets}
    assert by_text[0] == {"hi"} and by_text[1] == {"hi"} and by_text[2] == {"en"} and by_text[3] == {"mr"}


def planted_cell_model(full: SafetySuite, language: str, family: str, group: str, shift: float):
    """Scores 0.6 everywhere, ``shift`` added to one group's variants of one (language,
    family) cell's template sets."""
    targets = {s.variants[group] for s in full.sampled_template_sets
               if s.language == language and s.family == family and group in s.variants}
    return lambda texts: probabilities(np.array([0.6 + (shift if t in targets else 0.0) for t in texts]))


def test_a_planted_effect_is_found_where_it_was_planted_at_its_size() -> None:
    full = all_languages_suite()
    metrics = full.evaluate_classifier(CallableClassifier(planted_cell_model(full, "hi", "names", "muslim", -0.2))).metrics
    gaps = cell_keys(metrics, "group_gap")
    assert gaps.pop("counterfactual/hi/names/group_gap") == pytest.approx(0.2)
    assert all(value == 0.0 for value in gaps.values())
    # Every term of the group carries the shift: the gap is exact, and it is the headline.
    assert metrics["counterfactual/hi/names/group_gap_debiased"] == pytest.approx(0.2)
    assert metrics["counterfactual/group_gap_holm"] == pytest.approx(0.2)
    assert metrics["counterfactual/num_cells_holm"] == 1.0
    groups = [k for k in metrics if k.startswith("counterfactual/hi/names/") and k.endswith("/effect")]
    k = len(groups)
    # The planted group sits 0.2 * (k - 1) / k below its sets' mean, the others 0.2 / k above.
    assert metrics["counterfactual/hi/names/muslim/effect"] == pytest.approx(-0.2 * (k - 1) / k)
    assert metrics["counterfactual/hi/names/hindu/effect"] == pytest.approx(0.2 / k)
    assert metrics["counterfactual/hi/names/group_test_p_value"] < 0.01
    assert metrics["counterfactual/group_test_p_value"] < 0.01


def test_planted_gender_bias_flips_every_set_in_every_language() -> None:
    biased = suite().evaluate_classifier(CallableClassifier(planted_gender_bias(LANGUAGES))).metrics
    assert biased["counterfactual/num_applicable"] == biased["counterfactual/num_sets"] > 20
    assert biased["counterfactual/flip_rate"] == pytest.approx(1.0)
    assert biased["counterfactual/group_gap_holm"] == pytest.approx(0.9)
    for language in LANGUAGES:  # the Hindi and Tamil per-gender templates are found too
        assert biased[f"counterfactual/{language}/gender/flip_rate"] == pytest.approx(1.0)
        assert biased[f"counterfactual/{language}/gender/group_gap"] == pytest.approx(0.9)
        assert biased[f"counterfactual/{language}/gender/positive_rate_gap"] == pytest.approx(1.0)


def test_zero_flips_get_a_clopper_pearson_interval_not_a_point() -> None:
    scores = np.full(48, 0.7)
    result = counterfactual_fairness(np.repeat(np.arange(24), 2), ["gender"] * 48, ["m", "f"] * 24, scores,
                                     np.ones(48, dtype=int), [True, False] * 24, languages=["en"] * 48)
    assert result["flip_rate"] == 0.0
    assert result["flip_rate_ci_low"] == 0.0 and result["flip_rate_ci_high"] == pytest.approx(0.1425, abs=1e-3)
    assert "max_abs_score_change_ci_low" not in result and "group_gap_ci_low" not in result  # maxima: no interval


def test_bootstrap_interval_of_the_mean_score_change_covers_the_truth() -> None:
    """Sets resampled whole: over 200 simulated samples of 60 sets, the 95% interval of the
    mean score change holds the population mean in 90-99% of them."""
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(200):
        change = rng.exponential(0.05, 60)
        scores = np.column_stack([np.full(60, 0.5), 0.5 + change]).ravel()
        result = counterfactual_fairness(np.repeat(np.arange(60), 2), ["f"] * 120, ["a", "b"] * 60, scores,
                                         np.zeros(120, dtype=int), [True, False] * 60, languages=["en"] * 120,
                                         n_resamples=500, n_permutations=0)
        covered += result["mean_abs_score_change_ci_low"] <= 0.05 <= result["mean_abs_score_change_ci_high"]
    assert 0.90 <= covered / 200 <= 0.99


def test_average_group_fairness_is_scipys_wasserstein_distance_within_the_cell() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(300)
    groups = ["a", "b", "c"] * 100
    result = counterfactual_fairness(np.repeat(np.arange(100), 3), ["f"] * 300, groups, scores,
                                     (scores > 0.5).astype(int), [True, False, False] * 100, n_resamples=0)
    expected = np.mean([wasserstein_distance(scores[i::3], scores) for i in range(3)])
    assert result["all/f/average_group_fairness"] == pytest.approx(expected, rel=1e-12)
    # Paired effects: the within-set deviations' means, computed directly.
    deviations = scores.reshape(100, 3) - scores.reshape(100, 3).mean(axis=1, keepdims=True)
    effects = deviations.mean(axis=0)
    assert result["all/f/group_gap"] == pytest.approx(effects.max() - effects.min())
    assert result["all/f/b/effect"] == pytest.approx(effects[1])


def test_calibration_brier_and_debiased_ece_on_a_calibrated_model() -> None:
    """Labels drawn from the model's own probabilities: the debiased squared ECE is centred
    on 0 (and clearly positive for an overconfident model); the Brier interval holds its
    expectation 2 E[p(1 - p)] in 90-99% of 100 samples. The plug-in ECE stays small with
    equal-mass bins."""
    rng = np.random.default_rng(7)
    covered_brier, squared, overconfident, plain = 0, [], [], []
    for _ in range(100):
        p = rng.uniform(0.55, 0.95, 500)
        labels = (rng.random(500) < p).astype(int)
        result = calibration(np.column_stack([1 - p, p]), labels, n_resamples=300)
        squared.append(result["ece_squared_debiased"])
        plain.append(result["ece"])
        covered_brier += result["brier_ci_low"] <= np.mean(2 * p * (1 - p)) <= result["brier_ci_high"]
        sharp = np.clip(p + 0.1, 0, 0.999)  # claims 10 points more confidence than it has
        overconfident.append(calibration(np.column_stack([1 - sharp, sharp]), labels, n_resamples=0)["ece_squared_debiased"])
    assert abs(np.mean(squared)) < 2e-4 and np.mean(overconfident) > 0.005
    assert 90 <= covered_brier <= 99
    assert np.mean(plain) < 0.06  # 15 bins of 33: the plug-in bias


def test_ece_and_brier_match_hand_computed_values() -> None:
    probs = np.array([[0.1, 0.9], [0.3, 0.7], [0.45, 0.55], [0.8, 0.2], [0.35, 0.65]])
    labels = np.array([1, 0, 1, 0, 1])
    # sqrt(5) -> 2 equal-mass bins by confidence: {0.55, 0.65, 0.7} (right, right, wrong)
    # and {0.8, 0.9} (both right).
    result = calibration(probs, labels, n_bins=15, n_resamples=0)
    assert result["ece_bins"] == 2
    low = abs(np.mean([1, 1, 0]) - np.mean([0.55, 0.65, 0.7]))
    high = abs(np.mean([1, 1]) - np.mean([0.8, 0.9]))
    assert result["ece"] == pytest.approx((3 * low + 2 * high) / 5)
    brier = np.mean([(0.1 - 0) ** 2 + (0.9 - 1) ** 2, (0.3 - 1) ** 2 + 0.7**2, 0.45**2 + 0.45**2,
                     0.2**2 + 0.2**2, 0.35**2 + 0.35**2])
    assert result["brier"] == pytest.approx(brier)


def test_likelihood_gap_counts_ties_as_half() -> None:
    result = likelihood_gap([-3.0, -3.0, -2.0, -5.0], [-3.0, -3.0, -4.0, -1.0], n_resamples=0)
    assert result["tie_rate"] == 0.5
    assert result["preference_rate"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    uniform = likelihood_gap([-7.0] * 10, [-7.0] * 10, n_resamples=0)
    assert uniform["preference_rate"] == 0.5 and uniform["tie_rate"] == 1.0


def test_shared_suffix_scores_only_tokens_after_the_terms() -> None:
    """"Harleen is kind." / "Jasleen is kind." as WordPiece splits them: the names' common
    piece "##leen" is not part of what the two sentences share."""
    harleen = ScoredText(np.array([1, 2, 3, 7, 8, 9]), np.array([-1.0, -2, -3, -4, -5, -6]), np.array([0, 1, 3, 8, 11, 15]))
    jasleen = ScoredText(np.array([4, 3, 7, 8, 9]), np.array([-1.5, -2.5, -4.5, -5.5, -6.5]), np.array([0, 3, 8, 11, 15]))
    scored = {"Harleen is kind.": harleen, "Jasleen is kind.": jasleen}
    a, b = shared_suffix_log_likelihoods(scored, "Harleen is kind.", "Jasleen is kind.")
    assert (a, b) == (-4 - 5 - 6, -4.5 - 5.5 - 6.5)
    ended = {"He is Harleen": ScoredText(np.array([1, 2, 3]), np.zeros(3), np.array([0, 3, 6])),
             "He is Jasleen": ScoredText(np.array([1, 2, 4]), np.zeros(3), np.array([0, 3, 6]))}
    assert shared_suffix_log_likelihoods(ended, "He is Harleen", "He is Jasleen") is None


def test_group_gaps_match_per_group_rates() -> None:
    predictions = [1, 1, 0, 0, 1, 0, 1, 1]
    references = [1, 0, 0, 1, 1, 0, 0, 1]
    groups = ["x", "x", "x", "x", "y", "y", "y", "y"]
    result = group_gaps(predictions, references, groups, n_resamples=0)
    # x: accuracy 2/4, positive rate 2/4, TPR 1/2, FPR 1/2; y: accuracy 3/4, positive 3/4, TPR 2/2, FPR 1/2.
    assert result["accuracy_gap"] == pytest.approx(0.25)
    assert result["positive_rate_gap"] == pytest.approx(0.25)
    assert result["equalized_odds_gap"] == pytest.approx(0.5)


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


def test_template_sets_are_all_taken_by_default_and_sampled_evenly_by_cell() -> None:
    every = all_languages_suite().sampled_template_sets
    expected = sum(len(template_sets(load_lexicon(language))) for language in available_languages())
    assert len(every) == expected
    cells = {(s.language, s.family) for s in every}
    sampled = all_languages_suite(safety_max_template_sets=len(cells) * 2).sampled_template_sets
    counts = {cell: sum((s.language, s.family) == cell for s in sampled) for cell in cells}
    assert set(counts.values()) == {2}


def test_missing_labels_skip_label_metrics_with_a_note() -> None:
    result = suite().evaluate_classifier(CallableClassifier(constant_model), ["good film", "bad film"], [1, None])
    assert "calibration/ece" not in result.metrics and "adversarial/attack_success_rate" not in result.metrics
    assert "perturbation/invariance_failure_rate" in result.metrics and "perturbation/accuracy" not in result.metrics
    assert any("no label" in note for note in result.notes)


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
    assert math.isfinite(result["brier_ci_low"])
