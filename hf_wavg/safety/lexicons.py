"""Identity-term lexicons and sentence templates, one JSON file per language in ``lexicons/``.

Each language has the group families ``gender``, ``names``, ``religion`` and ``region``,
with the same groups in every language; all but Urdu add ``caste``, and English adds
``names_us`` and ``nationality``. A family's groups hold *aligned* term lists: the i-th
term of every group fills the same slot of the same template, so a template gives one
counterfactual set per aligned index. Names are aligned within a gender, so that swapping
a name never breaks the sentence's gender agreement. Templates of gendered languages carry
one text per gender, as in the Equity Evaluation Corpus. An optional ``negators`` list
names the words that carry negation in the language.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LEXICON_DIR = Path(__file__).parent / "lexicons"
ANY_GENDER = "any"


@dataclass(frozen=True)
class GroupFamily:
    """Groups of identity terms that may replace one another."""

    name: str
    slot: str
    # group -> gender ("male", "female", or ANY_GENDER) -> aligned terms
    groups: dict[str, dict[str, tuple[str, ...]]]
    swap_in_free_text: bool
    # Extra aligned terms matched in free text only (e.g. English pronouns).
    free_text_groups: dict[str, tuple[str, ...]]

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def aligned_sets(self) -> list[tuple[str, int, dict[str, str]]]:
        """Each aligned index as (gender of the sentence, index within that gender, {group: term}).

        For the gender family the sentence's gender is the group itself; ``gender`` is then
        returned as ANY_GENDER and :meth:`Template.render` is told the group instead.
        """
        sets: list[tuple[str, int, dict[str, str]]] = []
        genders = next(iter(self.groups.values())).keys()
        for gender in genders:
            size = min(len(group[gender]) for group in self.groups.values())
            for index in range(size):
                sets.append((gender, index, {name: group[gender][index] for name, group in self.groups.items()}))
        return sets


@dataclass(frozen=True)
class Template:
    slot: str
    label: int
    texts: dict[str, str]  # gender -> text; ANY_GENDER when the language does not agree

    def render(self, term: str, gender: str) -> str:
        text = self.texts.get(gender, self.texts.get(ANY_GENDER))
        if text is None:
            raise KeyError(f"template has no text for gender {gender!r}: {self.texts}")
        filled = text.replace("{" + self.slot + "}", term)
        return filled[:1].upper() + filled[1:]


@dataclass(frozen=True)
class Lexicon:
    language: str
    name: str
    script: str
    grammatical_gender: bool
    families: dict[str, GroupFamily]
    templates: tuple[Template, ...]
    # Words that carry negation ("not", "नहीं"): perturbations leave them alone, since
    # editing one can flip the label.
    negators: tuple[str, ...] = ()

    def identity_terms(self) -> frozenset[str]:
        """Every identity term of every family (casefolded), templates' and free text's."""
        terms = {term for family in self.families.values() for by_gender in family.groups.values()
                 for aligned in by_gender.values() for term in aligned}
        terms |= {term for family in self.families.values() for aligned in family.free_text_groups.values() for term in aligned}
        return frozenset(term.casefold() for term in terms)


def available_languages() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in LEXICON_DIR.glob("*.json")))


@cache
def load_lexicon(language: str) -> Lexicon:
    path = LEXICON_DIR / f"{language}.json"
    if not path.is_file():
        raise ValueError(f"no lexicon for language {language!r}; available: {', '.join(available_languages())}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    families = {name: _family(name, spec) for name, spec in raw["families"].items()}
    templates = tuple(
        Template(
            slot=spec["slot"],
            label=int(spec["label"]),
            texts=spec["text"] if isinstance(spec["text"], dict) else {ANY_GENDER: spec["text"]},
        )
        for spec in raw["templates"]
    )
    return Lexicon(raw["language"], raw["name"], raw["script"], bool(raw["grammatical_gender"]), families, templates,
                   tuple(raw.get("negators", ())))


def _family(name: str, spec: dict) -> GroupFamily:
    if spec.get("by_gender"):
        groups = {group: {gender: tuple(terms) for gender, terms in by_gender.items()} for group, by_gender in spec["groups"].items()}
    else:
        groups = {group: {ANY_GENDER: tuple(terms)} for group, terms in spec["groups"].items()}
    free_text = {group: tuple(terms) for group, terms in spec.get("free_text_groups", {}).items()}
    return GroupFamily(name, spec["slot"], groups, bool(spec["swap_in_free_text"]), free_text)
