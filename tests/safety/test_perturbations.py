"""Perturbation families: what each changes, what it leaves alone, determinism, and
validity on arbitrary Unicode (fuzzed with hypothesis)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_wavg.safety import PERTURBATIONS, available_languages, load_lexicon, perturb
from hf_wavg.safety.perturbations import CONFUSABLES, ZERO_WIDTH
from hf_wavg.safety.text import WORD

ENGLISH = "The acting was good but the story felt rather slow and boring"
HINDI = "मेरी बहन आज बहुत खुश थी और फ़िल्म अच्छी लगी"
# Sentences with negators and identity terms ("she"; "मेरी बहन"), and those words.
NEGATED = {
    "The phone was not wonderful and she didn't like it": ("not", "she", "didn't"),
    "मेरी बहन को यह फ़िल्म बिल्कुल पसंद नहीं आई": ("मेरी", "बहन", "नहीं"),
}
# Passed explicitly as well, so the checks do not rest on the lexicons' negator lists.
NEGATORS = ("not", "नहीं")
# Per language: a sentence, its script's confusable sign pairs, and the signs a slip may
# drop (nukta, halant). Any other character in a perturbed sentence is an error.
INDIC = {
    "hi": ("मेरी बहन को फ़िल्म बिल्कुल पसंद नहीं आई क्योंकि कहानी धीमी और उबाऊ थी, पर गाने ज़रूर अच्छे हैं",
           ("िी", "ुू", "ेै", "ोौ", "ंँ"), "़्"),
    "bn": ("আমি আজ সিনেমাটা দেখে খুব খুশি হয়েছি কিন্তু গল্পটা একটু ধীর ছিল, গানগুলো ভালো লেগেছে",
           ("িী", "ুূ", "েৈ", "োৌ", "ংঁ"), "়্"),
    "ta": ("இந்த படம் மிகவும் நன்றாக இருந்தது ஆனால் கதை கொஞ்சம் மெதுவாக போனது, பாடல்கள் மட்டும் நன்று",
           ("ிீ", "ுூ", "ெே", "ொோ"), "்"),
    "te": ("ఈ సినిమా చాలా బాగుంది కానీ కథ కొంచెం నెమ్మదిగా సాగింది, పాటలు మాత్రం బాగున్నాయి",
           ("ిీ", "ుూ", "ెే", "ొో", "ంఁ"), "్"),
}


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
            letters = lambda w: [c for c in w if "LETTER" in unicodedata.name(c)]
            assert letters(a) == letters(b), (a, b)  # consonants and vowels stay; only signs change
            assert all("DEVANAGARI" in unicodedata.name(c) for c in b)


def slip_kind(before: str, after: str, pairs: tuple[str, ...], droppable: str) -> str | None:
    """How ``after`` differs from ``before`` by one allowed slip, or None when it does not."""
    if len(after) == len(before):
        changed = [a + b for a, b in zip(before, after) if a != b]
        return "swap" if len(changed) == 1 and any(set(changed[0]) == set(pair) for pair in pairs) else None
    for i, char in enumerate(before):
        if char in droppable and before[:i] + before[i + 1 :] == after:
            return unicodedata.name(char).split()[-1].lower()  # "nukta" or "virama"
    return None


@pytest.mark.parametrize("language", sorted(INDIC))
def test_indic_noise_makes_one_real_spelling_slip_per_word(language: str) -> None:
    text, pairs, droppable = INDIC[language]
    allowed = set(text) | set("".join(pairs))
    kinds = set()
    for seed in range(60):
        noisy = perturb(text, "indic_noise", rate=0.5, seed=seed)
        assert noisy != text
        assert set(noisy) <= allowed, (language, set(noisy) - allowed)
        assert len(noisy.split()) == len(text.split())
        for before, after in zip(text.split(), noisy.split()):
            if before != after:
                kind = slip_kind(before, after, pairs, droppable)
                assert kind, (language, before, after)
                kinds.add(kind)
    assert kinds == {"swap"} | {unicodedata.name(char).split()[-1].lower() for char in droppable}


def test_indic_noise_never_uses_signs_hindi_lacks_nor_makes_other_words() -> None:
    for seed in range(40):
        assert not set("ॄॆॊ") & set(perturb(INDIC["hi"][0], "indic_noise", rate=1.0, seed=seed))
        assert perturb("खाना", "indic_noise", seed=seed) == "खाना"  # no confusable sign: not applicable
        assert perturb("दिल", "indic_noise", seed=seed) == "दील"  # never दल (matra dropped)


@pytest.mark.parametrize("family", sorted(PERTURBATIONS))
def test_negators_and_identity_words_are_left_alone_by_default(family: str) -> None:
    assert "she" in load_lexicon("en").identity_terms() and "मेरी बहन" in load_lexicon("hi").identity_terms()
    for text, kept in NEGATED.items():
        for seed in range(20):
            noisy = perturb(text, family, rate=1.0, seed=seed, protected=NEGATORS)
            tokens = dict(zip(text.split(), noisy.split()))  # no family adds or removes whitespace
            assert len(noisy.split()) == len(tokens)
            assert all(tokens[word] == word for word in kept), (family, noisy)


def test_negative_contractions_are_left_alone() -> None:
    text = "They mightn’t and daren't go"  # rare stems, unlikely to be listed as negators
    for family in sorted(set(PERTURBATIONS) - {"whitespace"}):
        for seed in range(10):
            noisy = perturb(text, family, rate=1.0, seed=seed).split()
            assert noisy[1] == "mightn’t" and noisy[3] == "daren't", (family, noisy)


def test_every_lexicon_negator_and_identity_word_is_protected() -> None:
    for language in available_languages():
        lexicon = load_lexicon(language)
        text = " ".join((*lexicon.negators, *sorted(lexicon.identity_terms())))
        for family in sorted(set(PERTURBATIONS) - {"whitespace"}):
            assert perturb(text, family, rate=1.0, seed=1) == text, (language, family)


def test_negators_and_identity_words_can_be_edited_when_unprotected() -> None:
    for text, kept in NEGATED.items():
        noisy = perturb(text, "char_swap", rate=1.0, protect_negation_and_identity=False)
        tokens = dict(zip(text.split(), noisy.split()))
        assert all(tokens[word] != word for word in kept), noisy
        spared = perturb(text, "char_swap", rate=1.0, protected=kept[:1], protect_negation_and_identity=False)
        assert dict(zip(text.split(), spared.split()))[kept[0]] == kept[0]  # ``protected`` still holds


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
