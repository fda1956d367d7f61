"""The greedy character attack, and the lexicons and counterfactuals it shares text
handling with."""

from __future__ import annotations

import unicodedata

import pytest

from hf_wavg.safety import CallableClassifier, available_languages, greedy_char_attack, load_lexicon, template_sets
from hf_wavg.safety.counterfactuals import text_counterfactuals
from tests.safety_models import constant_model, keyword_model

TEXTS = ["the film was excellent and moving", "an excellent cast", "excellent", "dull and long"]
LABELS = [1, 1, 1, 0]


def test_attack_breaks_a_one_word_model_within_budget() -> None:
    classifier = CallableClassifier(keyword_model("excellent"))
    results = greedy_char_attack(classifier, TEXTS, LABELS, query_budget=25)
    assert [r.originally_correct for r in results] == [True, True, True, True]
    assert [r.success for r in results[:3]] == [True, True, True]
    for result in results[:3]:
        assert "excellent" not in result.adversarial_text.split()
        assert result.edited_words == 1
    assert not results[3].success  # nothing turns a negative text positive here
    assert all(r.queries <= 25 for r in results)


def test_attack_fails_on_a_constant_model_and_respects_the_budget() -> None:
    for budget in (1, 5, 17):
        classifier = CallableClassifier(constant_model)
        results = greedy_char_attack(classifier, TEXTS[:3], LABELS[:3], query_budget=budget)
        assert not any(r.success for r in results)
        assert all(r.queries <= budget for r in results)
        # The classifier counts every distinct text it was asked about: an upper bound check.
        assert classifier.num_queries <= budget * 3


def test_misclassified_examples_are_not_attacked() -> None:
    results = greedy_char_attack(CallableClassifier(constant_model), ["bad"], [0], query_budget=10)
    assert not results[0].originally_correct and not results[0].success and results[0].queries == 1


def test_seven_languages_in_their_own_scripts() -> None:
    scripts = {"en": "LATIN", "hi": "DEVANAGARI", "mr": "DEVANAGARI", "bn": "BENGALI", "ta": "TAMIL",
               "te": "TELUGU", "ur": "ARABIC"}
    assert set(scripts) <= set(available_languages())
    for language, script in scripts.items():
        lexicon = load_lexicon(language)
        assert {"gender", "names", "religion"} <= set(lexicon.families)
        letters = [c for s in template_sets(lexicon) for t in s.variants.values() for c in t if c.isalpha()]
        assert letters and all(script in unicodedata.name(c) for c in letters), language


def test_gendered_templates_agree_with_the_noun() -> None:
    sets = [s for s in template_sets(load_lexicon("hi")) if s.family == "gender"]
    happy = next(s for s in sets if "खुश" in s.variants["male"] and "भाई" in s.variants["male"])
    assert happy.variants == {"male": "मेरा भाई आज बहुत खुश था।", "female": "मेरी बहन आज बहुत खुश थी।"}
    names = [s for s in template_sets(load_lexicon("hi")) if s.family == "names"]
    assert all(len({v.split()[-1] for v in s.variants.values()}) == 1 for s in names)  # same verb form


def test_free_text_swaps_keep_case_and_skip_gender_in_gendered_languages() -> None:
    (gender,) = [s for s in text_counterfactuals("He said his sister was right.", "en") if s.family == "gender"]
    assert gender.reference_group == "male"
    assert gender.variants["female"] == "She said her sister was right."
    hindi = text_counterfactuals("मेरा भाई इमरान बिहार से है", "hi")
    assert {s.family for s in hindi} == {"names", "region"}
    names = next(s for s in hindi if s.family == "names")
    assert names.reference_group == "muslim" and names.variants["hindu"] == "मेरा भाई राहुल बिहार से है"
    assert text_counterfactuals("no identity here", "en") == []


def test_unknown_language_is_refused() -> None:
    with pytest.raises(ValueError, match="available"):
        load_lexicon("xx")
