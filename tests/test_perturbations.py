"""Perturbation families: what each changes, what it leaves alone, determinism, and
validity on arbitrary Unicode (fuzzed with hypothesis)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_wavg.safety import PERTURBATIONS, perturb
from hf_wavg.safety.perturbations import CONFUSABLES, ZERO_WIDTH
from hf_wavg.safety.text import WORD

ENGLISH = "The acting was good but the story felt rather slow and boring"
HINDI = "मेरी बहन आज बहुत खुश थी और फ़िल्म अच्छी लगी"


def words(text: str) -> list[str]:
    return WORD.findall(text)


@pytest.mark.parametrize("family", sorted(PERTURBATIONS))
def test_each_family_changes_english_or_hindi_and_is_deterministic(family: str) -> None:
    text = HINDI if family == "indic_noise" else ENGLISH
    noisy = perturb(text, family, rate=0.3, seed=3)
    assert noisy != text
    assert perturb(text, family, rate=0.3, seed=3) == noisy
    assert any(perturb(text, family, rate=0.3, seed=s) != noisy for s in range(4, 12))


@pytest.mark.parametrize("family", sorted(set(PERTURBATIONS) - {"whitespace"}))
def test_protected_words_are_left_alone(family: str) -> None:
    text = HINDI if family == "indic_noise" else ENGLISH
    protected = words(text)[1::2]
    for seed in range(10):
        noisy = perturb(text, family, rate=1.0, seed=seed, protected=protected)
        for word in protected:
            assert word in noisy, (family, word, noisy)


def test_families_edit_as_described() -> None:
    assert perturb(ENGLISH, "case", rate=1.0).casefold() == ENGLISH.casefold()
    assert perturb(ENGLISH, "whitespace", rate=1.0).split() == ENGLISH.split()
    assert perturb(ENGLISH, "zero_width", rate=1.0).translate({ord(z): None for z in ZERO_WIDTH}) == ENGLISH
    confused = perturb(ENGLISH, "confusables", rate=1.0)
    assert len(confused) == len(ENGLISH)
    assert all(a == b or CONFUSABLES.get(a) == b for a, b in zip(ENGLISH, confused))
    assert perturb(ENGLISH, "punctuation", rate=1.0).replace("!", "").replace("?", "").replace(".", "") \
        .replace(",", "").replace(";", "").replace(":", "") == ENGLISH
    assert perturb("Hello world", "confusables") != "Hello world"
    assert perturb(HINDI, "confusables") == HINDI  # no Latin letters: not applicable


def test_indic_noise_edits_only_signs_within_the_script() -> None:
    for seed in range(20):
        noisy = perturb(HINDI, "indic_noise", rate=0.5, seed=seed)
        assert noisy != HINDI
        assert len(words(noisy)) == len(words(HINDI))
        for a, b in zip(words(HINDI), words(noisy)):
            letters = lambda w: [c for c in w if "LETTER" in unicodedata.name(c)]  # noqa: E731
            assert letters(a) == letters(b), (a, b)  # consonants and vowels stay; only signs change
            assert all("DEVANAGARI" in unicodedata.name(c) for c in b)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60), family=st.sampled_from(sorted(PERTURBATIONS)), seed=st.integers(0, 2**16))
def test_perturbations_return_valid_strings_on_arbitrary_unicode(text: str, family: str, seed: int) -> None:
    noisy = perturb(text, family, rate=0.5, seed=seed)
    assert isinstance(noisy, str)
    noisy.encode("utf-8")  # no lone surrogates
    assert perturb(text, family, rate=0.5, seed=seed) == noisy


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("x", "typo")
    with pytest.raises(ValueError, match="rate"):
        perturb("x", "case", rate=0)
