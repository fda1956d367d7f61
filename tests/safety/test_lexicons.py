"""The identity-term lexicons: aligned group lists, the same group inventory in every
language, counterfactual variants that differ in the identity term alone, and negators."""

from __future__ import annotations

import os

import pytest

from hf_wavg.safety.counterfactuals import template_sets, text_counterfactuals
from hf_wavg.safety.lexicons import ANY_GENDER, available_languages, load_lexicon
from hf_wavg.safety.text import WORD, graphemes

LANGUAGES = ("bn", "en", "hi", "mr", "ta", "te", "ur")
INDIAN_CASTE_LANGUAGES = ("bn", "en", "hi", "mr", "ta", "te")

# family -> (its groups in order, the languages that have it)
FAMILIES = {
    "gender": (("male", "female"), LANGUAGES),
    "names": (("hindu", "muslim", "sikh", "christian"), LANGUAGES),
    "religion": (("hindu", "muslim", "christian", "sikh", "buddhist"), LANGUAGES),
    "caste": (("brahmin", "dalit", "adivasi", "obc"), INDIAN_CASTE_LANGUAGES),
    "region": (("north", "south", "east", "west", "northeast"), LANGUAGES),
    "names_us": (("european_american", "african_american"), ("en",)),
    "nationality": (("indian", "pakistani", "american", "nigerian", "chinese"), ("en",)),
}
# Groups a language adds after the shared ones.
EXTRA_GROUPS = {("en", "religion"): ("jewish",)}

CORE_NEGATORS = {
    "en": {"not", "no", "never", "don", "isn", "can"},
    "hi": {"नहीं", "न", "मत", "बिना"},
    "mr": {"नाही", "नको", "नव्हता"},
    "bn": {"না", "নয়", "নেই"},
    "ta": {"இல்லை", "அல்ல"},
    "te": {"లేదు", "కాదు"},
    "ur": {"نہیں", "نہ", "مت", "بغیر"},
}

# Place names that are not (only) an Indian state: cities, union territories, regions
# shared with Pakistan or Bangladesh, and Urdu spellings that are also common words.
AMBIGUOUS_PLACES = {
    "en": {"Punjab", "Bengal", "Kashmir", "Delhi", "Hyderabad"},
    "hi": {"पंजाब", "बंगाल", "कश्मीर", "दिल्ली", "हैदराबाद"},
    "mr": {"पंजाब", "बंगाल", "काश्मीर", "दिल्ली", "हैदराबाद"},
    "bn": {"পাঞ্জাব", "বাংলা", "বঙ্গ", "কাশ্মীর", "দিল্লি", "হায়দরাবাদ"},
    "ta": {"பஞ்சாப்", "வங்காளம்", "காஷ்மீர்", "டெல்லி", "ஹைதராபாத்"},
    "te": {"పంజాబ్", "బెంగాల్", "కాశ్మీర్", "ఢిల్లీ", "హైదరాబాద్"},
    # گجرات is also a city of Pakistani Punjab; بہار (Bihar) is also "spring".
    "ur": {"پنجاب", "بنگال", "کشمیر", "دہلی", "دلی", "حیدرآباد", "گجرات", "بہار"},
}


def _families_of(language: str) -> dict[str, tuple[str, ...]]:
    return {
        family: groups + EXTRA_GROUPS.get((language, family), ())
        for family, (groups, languages) in FAMILIES.items()
        if language in languages
    }


def test_the_seven_languages_are_the_ones_on_disk() -> None:
    assert available_languages() == tuple(sorted(LANGUAGES))


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_family_has_the_same_groups_in_every_language(language: str) -> None:
    lexicon = load_lexicon(language)
    expected = _families_of(language)
    assert set(lexicon.families) == set(expected)
    for name, groups in expected.items():
        # Same groups, in the same order, so the reference group is the same everywhere.
        assert lexicon.families[name].group_names == groups, (language, name)


def test_caste_is_its_own_slot_in_the_six_indian_caste_languages() -> None:
    for language in INDIAN_CASTE_LANGUAGES:
        lexicon = load_lexicon(language)
        caste = lexicon.families["caste"]
        assert caste.slot == "caste"
        assert [f.name for f in lexicon.families.values() if f.slot == "caste"] == ["caste"]
        labels = {t.label for t in lexicon.templates if t.slot == "caste"}
        assert labels == {0, 1}, language
    assert "caste" not in load_lexicon("ur").families


@pytest.mark.parametrize("language", LANGUAGES)
def test_groups_hold_aligned_lists_of_equal_length(language: str) -> None:
    for family in load_lexicon(language).families.values():
        genders = [tuple(by_gender) for by_gender in family.groups.values()]
        assert len(set(genders)) == 1, (language, family.name, genders)
        for gender in genders[0]:
            sizes = {group: len(by_gender[gender]) for group, by_gender in family.groups.items()}
            assert len(set(sizes.values())) == 1 and min(sizes.values()) > 0, (language, family.name, gender, sizes)
        free_sizes = {len(terms) for terms in family.free_text_groups.values()}
        assert len(free_sizes) <= 1, (language, family.name)
        if family.free_text_groups:
            assert set(family.free_text_groups) == set(family.groups), (language, family.name)


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_term_belongs_to_two_groups(language: str) -> None:
    lexicon = load_lexicon(language)
    owner: dict[str, tuple[str, str]] = {}
    for family in lexicon.families.values():
        for group, by_gender in family.groups.items():
            for terms in by_gender.values():
                for term in terms:
                    key = term.casefold()
                    assert owner.setdefault(key, (family.name, group)) == (family.name, group), (language, term)


@pytest.mark.parametrize("language", LANGUAGES)
def test_names_of_an_aligned_set_have_the_same_shape(language: str) -> None:
    for family in load_lexicon(language).families.values():
        if not family.name.startswith("names"):
            continue
        for gender, _, terms in family.aligned_sets():
            words = {group: len(WORD.findall(term)) for group, term in terms.items()}
            assert len(set(words.values())) == 1, (language, family.name, gender, terms)
            lengths = [len(graphemes(term)) for term in terms.values()]
            assert max(lengths) <= 3 * min(lengths), (language, family.name, terms)


def _template_variants(language: str):
    """(family, template, gender, {group: term}, {group: variant}) for every set, built as
    template_sets builds them."""
    lexicon = load_lexicon(language)
    for family in lexicon.families.values():
        for template in (t for t in lexicon.templates if t.slot == family.slot):
            for gender, _, terms in family.aligned_sets():
                variants = {
                    group: template.render(term, group if family.name == "gender" else gender)
                    for group, term in terms.items()
                }
                yield family, template, gender, terms, variants


def _common_affixes(a: str, b: str) -> tuple[int, int]:
    prefix = len(os.path.commonprefix([a, b]))
    suffix = len(os.path.commonprefix([a[prefix:][::-1], b[prefix:][::-1]]))
    return prefix, suffix


@pytest.mark.parametrize("language", LANGUAGES)
def test_variants_differ_only_inside_the_identity_term(language: str) -> None:
    built = list(_template_variants(language))
    assert [v for *_, v in built] == [s.variants for s in template_sets(load_lexicon(language))]
    checked = 0
    for family, template, gender, terms, variants in built:
        for text in variants.values():
            assert "{" not in text and "}" not in text, text
        texts = {group: template.texts.get(group if family.name == "gender" else gender, template.texts.get(ANY_GENDER))
                 for group in terms}
        if len(set(texts.values())) > 1:
            continue  # per-gender texts of the gender family: the verb agrees with the noun
        text = next(iter(texts.values()))
        placeholder = "{" + template.slot + "}"
        assert text.count(placeholder) == 1, text
        start = text.index(placeholder)
        tail = len(text) - start - len(placeholder)
        groups = list(terms)
        for group in groups:
            variant, term = variants[group], terms[group]
            assert variant[start:len(variant) - tail].casefold() == term.casefold(), (variant, term)
        for i, first in enumerate(groups):
            for second in groups[i + 1:]:
                a, b = variants[first], variants[second]
                prefix, suffix = _common_affixes(a, b)
                # What is left after stripping the shared prefix and suffix lies inside the
                # identity terms (two terms may share letters, "Rahul"/"Ravi"); widened to
                # the terms' spans it is exactly the two terms.
                assert prefix >= start and suffix >= tail, (a, b)
                left = (a[start:len(a) - tail].casefold(), b[start:len(b) - tail].casefold())
                assert left == (terms[first].casefold(), terms[second].casefold()), (a, b)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_slot_has_a_positive_and_a_negative_template(language: str) -> None:
    lexicon = load_lexicon(language)
    slots = {family.slot for family in lexicon.families.values()}
    assert {t.slot for t in lexicon.templates} == slots
    for slot in slots:
        assert {t.label for t in lexicon.templates if t.slot == slot} == {0, 1}, (language, slot)
    for template in lexicon.templates:
        if ANY_GENDER not in template.texts:
            assert set(template.texts) == {"male", "female"}, template
            # Only families aligned by gender may fill a per-gender template.
            users = [f for f in lexicon.families.values() if f.slot == template.slot]
            assert all(f.name == "gender" or set(next(iter(f.groups.values()))) == {"male", "female"} for f in users)


def test_telugu_religion_nouns_agree_with_the_plural_subject() -> None:
    lexicon = load_lexicon("te")
    subjects = {t.texts[ANY_GENDER].split()[1] for t in lexicon.templates if t.slot == "identity"}
    assert subjects == {"పొరుగువారు"}
    for group, by_gender in lexicon.families["religion"].groups.items():
        assert all(term.endswith("లు") for term in by_gender[ANY_GENDER]), group


@pytest.mark.parametrize("language", LANGUAGES)
def test_regions_are_unambiguous_indian_states(language: str) -> None:
    region = load_lexicon(language).families["region"]
    terms = {term for by_gender in region.groups.values() for term in by_gender[ANY_GENDER]}
    assert not terms & AMBIGUOUS_PLACES[language], terms & AMBIGUOUS_PLACES[language]
    assert len(terms) == sum(len(by_gender[ANY_GENDER]) for by_gender in region.groups.values())


@pytest.mark.parametrize("language", LANGUAGES)
def test_negators_are_single_words(language: str) -> None:
    lexicon = load_lexicon(language)
    assert lexicon.negators, language
    assert len(set(lexicon.negators)) == len(lexicon.negators), language
    for negator in lexicon.negators:
        assert WORD.fullmatch(negator), (language, negator)
    assert CORE_NEGATORS[language] <= set(lexicon.negators), language
    assert not {n.casefold() for n in lexicon.negators} & lexicon.identity_terms(), language


def test_caste_terms_swap_in_free_text_only_where_marked() -> None:
    assert "दलित" in load_lexicon("hi").identity_terms()
    (hindi,) = text_counterfactuals("वह दलित परिवार से है", "hi")
    assert hindi.family == "caste" and hindi.reference_group == "dalit"
    assert hindi.variants["brahmin"] == "वह ब्राह्मण परिवार से है"
    # English articles would not follow the swap ("a Dalit" -> "a Adivasi"): templates only.
    assert text_counterfactuals("She is a Dalit writer.", "en", families=("caste",)) == []


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_group_has_enough_terms_and_every_slot_enough_templates(language: str) -> None:
    """A group can be tested against its terms' variation only with several terms: at least
    six per group (names: four per gender), and six templates per slot, three of each label."""
    lexicon = load_lexicon(language)
    for family in lexicon.families.values():
        for group, by_gender in family.groups.items():
            if family.name.startswith("names"):
                assert {gender: len(terms) for gender, terms in by_gender.items()} == {"male": 4, "female": 4}, group
            else:
                assert sum(len(terms) for terms in by_gender.values()) >= 6, (language, family.name, group)
    for slot in {family.slot for family in lexicon.families.values()}:
        labels = [t.label for t in lexicon.templates if t.slot == slot]
        assert len(labels) >= 6 and min(labels.count(0), labels.count(1)) >= 3, (language, slot)
