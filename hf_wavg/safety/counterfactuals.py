"""Counterfactual sets: the same sentence with the identity term of one group swapped for
each other group of its family.

Two sources: the lexicon's templates (every language, labels known) and the user's own
texts, where terms of families marked ``swap_in_free_text`` are found and replaced. Gender
is never swapped in the free text of languages with grammatical gender (the verb and
adjective would disagree); their gender counterfactuals come from the per-gender templates.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import cache

import regex

from hf_wavg.safety.lexicons import GroupFamily, Lexicon, load_lexicon
from hf_wavg.safety.text import WORD_CHARS, match_case, replace_spans


@dataclass(frozen=True)
class CounterfactualSet:
    """One sentence in every group of a family. ``reference_group`` names the original
    (for texts) or the first group (for templates); score changes are measured from it.

    ``terms`` names the identity term each variant holds; sets of one cell with the same
    ``block`` hold the same term for every group (the lexicon's i-th aligned terms), and sets
    with the same ``template`` are one sentence frame. Group-level inference takes terms as
    its units (several per group, in blocks), and intervals resample blocks and templates."""

    language: str
    family: str
    variants: dict[str, str]
    reference_group: str
    label: int | None = None
    source: str = "template"
    text_index: int | None = None
    terms: dict[str, str] | None = None
    block: str = ""
    template: str = ""

    @property
    def block_key(self) -> str:
        """The set's block: when nothing names its terms, the words in which its variants
        differ (a corpus that swaps "he" for "she" in every sentence has one term per group,
        however many sentences it holds)."""
        if self.block:
            return self.block
        return "|".join(f"{group}={term}" for group, term in sorted(differing_words(self.variants).items()))

    @property
    def template_key(self) -> str:
        return self.template or self.reference_text

    @property
    def reference_text(self) -> str:
        return self.variants[self.reference_group]


def differing_words(variants: dict[str, str]) -> dict[str, str]:
    """Each variant's words between the longest start and end that all variants share,
    casefolded: the terms that were swapped ("He is late." / "She is late." -> "he" / "she")."""
    words = {group: text.casefold().split() for group, text in variants.items()}
    shortest = min(len(w) for w in words.values())
    start = 0
    while start < shortest and len({w[start] for w in words.values()}) == 1:
        start += 1
    end = 0
    while end < shortest - start and len({w[len(w) - 1 - end] for w in words.values()}) == 1:
        end += 1
    return {group: " ".join(w[start:len(w) - end]) for group, w in words.items()}


def template_sets(lexicon: Lexicon, families: tuple[str, ...] | None = None) -> list[CounterfactualSet]:
    """Every (template, aligned term index) of the lexicon as a counterfactual set."""
    sets = []
    for family in lexicon.families.values():
        if families is not None and family.name not in families:
            continue
        for template_index, template in enumerate(lexicon.templates):
            if template.slot != family.slot:
                continue
            for gender, index, terms in family.aligned_sets():
                variants = {
                    group: template.render(term, group if family.name == "gender" else gender)
                    for group, term in terms.items()
                }
                sets.append(CounterfactualSet(
                    lexicon.language, family.name, variants, family.group_names[0], template.label,
                    terms=dict(terms), block=block_key(gender, index),
                    template=f"{lexicon.language}:template:{template_index}",  # frames differ across languages
                ))
    return sets


def block_key(gender: str, index: int) -> str:
    """The block of the sets whose terms are the ``index``-th aligned terms of ``gender``: a
    template's sets and a free text's with the same matched term share it."""
    return f"{gender}:{index}"


@dataclass(frozen=True)
class _TermMatcher:
    pattern: regex.Pattern
    # casefolded term -> (group, gender, aligned index); the first listing wins
    lookup: dict[str, tuple[str, str, int]]
    # (group, gender) -> aligned terms, for looking up the replacement
    terms: dict[tuple[str, str], tuple[str, ...]]


@cache
def _matcher(language: str, family_name: str) -> _TermMatcher:
    family: GroupFamily = load_lexicon(language).families[family_name]
    lookup: dict[str, tuple[str, str, int]] = {}
    terms: dict[tuple[str, str], tuple[str, ...]] = {}
    listings = [(group, gender, aligned) for group, by_gender in family.groups.items() for gender, aligned in by_gender.items()]
    listings += [(group, "free_text", aligned) for group, aligned in family.free_text_groups.items()]
    for group, gender, aligned in listings:
        terms[(group, gender)] = aligned
        for index, term in enumerate(aligned):
            lookup.setdefault(term.casefold(), (group, gender, index))
    alternatives = "|".join(regex.escape(term) for term in sorted(lookup, key=len, reverse=True))
    pattern = regex.compile(rf"(?<![{WORD_CHARS}])(?:{alternatives})(?![{WORD_CHARS}])", regex.IGNORECASE)
    return _TermMatcher(pattern, lookup, terms)


def text_counterfactuals(
    text: str,
    language: str,
    families: tuple[str, ...] | None = None,
    label: int | None = None,
    text_index: int | None = None,
) -> list[CounterfactualSet]:
    """Counterfactual sets of a free text, one per family whose terms it contains.

    Every matched term is replaced by the aligned term of the target group, so "he lost his
    keys" becomes "she lost her keys". The reference group is the most frequent group among
    the matches. A text without identity terms gives no set: it is *not applicable*, which
    the metrics report apart from fair results.
    """
    lexicon = load_lexicon(language)
    sets = []
    for family in lexicon.families.values():
        if not family.swap_in_free_text or (families is not None and family.name not in families):
            continue
        matcher = _matcher(language, family.name)
        matches = [(m.span(), m.group(), matcher.lookup[m.group().casefold()]) for m in matcher.pattern.finditer(text)]
        if not matches:
            continue
        reference = Counter(group for _, _, (group, _, _) in matches).most_common(1)[0][0]
        variants, terms = {}, {}
        for target in family.group_names:
            replacements = {}
            for span, found, (group, gender, index) in matches:
                aligned = matcher.terms[(target, gender)]
                replacements[span] = found if group == target else match_case(found, aligned[index])
            variants[target] = replace_spans(text, replacements)
            terms[target] = " + ".join(dict.fromkeys(replacements.values()))
        variants[reference] = text
        # The aligned positions of the matched terms: texts with one matched term share the
        # block of the templates' sets with the same aligned term.
        positions = dict.fromkeys(block_key(gender, index) for _, _, (_, gender, index) in matches)
        sets.append(CounterfactualSet(language, family.name, variants, reference, label, "text", text_index,
                                      terms=terms, block=" + ".join(positions), template=f"text:{text}"))
    return sets


def random_counterfactual(text: str, languages: tuple[str, ...], rng: random.Random) -> str | None:
    """One counterfactual of ``text`` in a randomly chosen other group, or None when it holds
    no swappable identity term (used by the logit-pairing penalty)."""
    candidates = [
        (cf_set, group)
        for language in languages
        for cf_set in text_counterfactuals(text, language)
        for group, variant in cf_set.variants.items()
        if group != cf_set.reference_group and variant != text
    ]
    if not candidates:
        return None
    cf_set, group = rng.choice(candidates)
    return cf_set.variants[group]
