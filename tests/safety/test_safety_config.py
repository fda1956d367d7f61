"""SafetyConfig refuses a bad value by naming the field, what it allows, and the value."""

from __future__ import annotations

import logging
import re

import pytest

from hf_wavg.safety import SafetyConfig


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("safety_max_examples", -1, "an integer >= 0"),
        ("safety_query_budget", 0, "an integer >= 1"),
        ("safety_max_template_sets", -2, "an integer >= 0 or None"),
        ("safety_logit_pairing_weight", -0.5, ">= 0"),
        ("safety_perturbation_rate", 1.5, "in (0, 1]"),
        ("safety_confidence_level", 1.0, "in the open interval (0, 1)"),
    ],
)
def test_a_value_out_of_range_names_the_field_and_the_allowed_range(name, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"SafetyConfig.{name} must be {allowed}; got {value!r}")):
        SafetyConfig(**{name: value})
    SafetyConfig(**{name: SafetyConfig.__dataclass_fields__[name].default})  # the default is allowed


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("safety_languages", ["xx"], "no lexicon for 'xx'; available: "),
        ("safety_families", ["planets"], "unknown family 'planets'; known: "),
        ("safety_perturbations", ["shout"], "unknown 'shout'; known: "),
    ],
)
def test_an_unknown_choice_lists_the_known_ones(name, value, message):
    with pytest.raises(ValueError, match=re.escape(f"SafetyConfig.{name}: {message}")):
        SafetyConfig(**{name: value})


@pytest.mark.parametrize(
    ("settings", "field", "allowed"),
    [
        ({"safety_n_resamples": "1000"}, "safety_n_resamples", "an integer >= 0"),
        ({"safety_attack_examples": True}, "safety_attack_examples", "an integer >= 0"),
        ({"safety_confidence_level": "0.9"}, "safety_confidence_level", "a number"),
        ({"safety_perturbation_rate": float("nan")}, "safety_perturbation_rate", "a finite number"),
        ({"safety_languages": "hi"}, "safety_languages", "a list of strings"),
        ({"safety_text_column": 3}, "safety_text_column", "a string"),
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_the_field(settings, field, allowed):
    with pytest.raises(ValueError, match=rf"SafetyConfig\.{field} must be {allowed}"):
        SafetyConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"safety_attack_examples": 0, "safety_query_budget": 60}, "safety_query_budget is set but"),
        ({"safety_max_examples": 0, "safety_perturbation_rate": 0.3}, "safety_perturbation_rate is set but"),
        ({"safety_perturbations": ["case"], "safety_perturbations_per_example": 2}, "exceeds the 1 perturbation"),
    ],
)
def test_settings_that_do_nothing_are_warned_about(settings, warned, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_wavg.safety.config"):
        SafetyConfig(**settings)
    assert warned in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wavg.safety.config"):
        SafetyConfig()
    assert not caplog.text
