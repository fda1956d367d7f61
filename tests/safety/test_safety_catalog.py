"""Every metric the suite reports has a declared direction, and the direction decides
which way soups and sweeps optimise."""

from __future__ import annotations

import pytest

from hf_wavg.safety import CallableClassifier, SafetyConfig, SafetySuite
from hf_wavg.safety.catalog import DIRECTIONS, HEADLINE_METRICS, greater_is_better
from tests.safety.safety_models import planted_gender_bias


def test_every_metric_the_suite_reports_is_declared():
    config = SafetyConfig(safety_languages=["en", "hi"], safety_max_template_sets=8, safety_max_examples=8,
                          safety_attack_examples=2, safety_query_budget=4, safety_n_resamples=20)
    texts = ["She loved the hotel.", "He hated the food.", "The room was fine.", "वह होटल अच्छा था"] * 2
    classifier = CallableClassifier(planted_gender_bias(config.languages))
    result = SafetySuite(config).evaluate_classifier(classifier, texts, [1, 0, 1, 1] * 2, ["a", "b"] * 4)
    leaves = {key.rsplit("/", 1)[-1].removesuffix("_ci_low").removesuffix("_ci_high") for key in result.metrics}
    assert len(leaves) > 20 and not leaves - set(DIRECTIONS), sorted(leaves - set(DIRECTIONS))
    assert all(DIRECTIONS[key.rsplit("/", 1)[-1]] is not None for key, _ in HEADLINE_METRICS)


def test_directions_decide_and_a_directionless_metric_is_refused():
    assert not greater_is_better("safety/counterfactual/hi/names/flip_rate")
    assert greater_is_better("safety/counterfactual/group_test_p_value")
    assert not greater_is_better("safety/counterfactual/group_gap_holm")
    assert greater_is_better("safety/adversarial/accuracy_under_attack") and greater_is_better("f1")
    assert not greater_is_better("eval_loss") and not greater_is_better("wer")
    with pytest.raises(ValueError, match="no better direction"):
        greater_is_better("safety/likelihood/en/gender/preference_rate")
