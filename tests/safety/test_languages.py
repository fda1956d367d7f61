"""The lexicons and the counterfactuals built from them."""

from __future__ import annotations

import unicodedata

import pytest

from hf_wavg.safety import available_languages, load_lexicon, template_sets
from hf_wavg.safety.counterfactuals import text_counterfactuals


def test_seven_languages_in_their_own_scripts() -> None:
    scripts = {"en": "LATIN", "hi": "DEVANAGARI", "mr": "DEVANAGARI", "bn": "BENGALI", "ta": "TAMIL",
               "te": "TELUGU", "ur": "ARABIC"}
    assert set(scripts) <= set(available_languages())
    for language, script in scripts.items():
        lexicon = load_lexicon(language)
        assert {"gender", "names", "religion", "region"} <= set(lexicon.families)
        letters = [c for s in template_sets(lexicon) for t in s.variants.values() for c in t if c.isalpha()]
        letters += [c for negator in lexicon.negators for c in negator if c.isalpha()]
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
