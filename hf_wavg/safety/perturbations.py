"""Label-preserving text perturbations, each a family of noise a real user produces.

Every perturbation edits whole words chosen at random (a share ``rate`` of the eligible
words, at least one), never touches ``protected`` words (e.g. the words that carry the
label) nor, by default, the negators and identity-term words of any lexicon language
(editing "not" or "she" can change the label or the group a text speaks of), works on
grapheme clusters so Indic syllables stay well formed, and is deterministic given
``seed``: the random generator is seeded from the seed, the family and the text, so
results do not depend on call order.
"""

from __future__ import annotations

import itertools
import random
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache

from hf_wavg.safety.lexicons import available_languages, load_lexicon
from hf_wavg.safety.text import WORD, char_names, graphemes, replace_spans, word_spans

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEYBOARD_NEIGHBOURS = {
    char: "".join(
        KEYBOARD_ROWS[r][c]
        for r in range(max(0, row - 1), min(3, row + 2))
        for c in range(max(0, col - 1), col + 2)
        if c < len(KEYBOARD_ROWS[r]) and KEYBOARD_ROWS[r][c] != char
    )
    for row, keys in enumerate(KEYBOARD_ROWS)
    for col, char in enumerate(keys)
}
# Latin letters and Cyrillic or Greek look-alikes (Unicode TR39 confusables).
CONFUSABLES = {
    "a": "а", "c": "с", "e": "е", "i": "і", "j": "ј", "o": "о", "p": "р", "s": "ѕ", "x": "х", "y": "у",
    "A": "А", "B": "В", "C": "С", "E": "Е", "H": "Н", "I": "І", "K": "К", "M": "М", "O": "О", "P": "Р",
    "T": "Т", "X": "Х", "Y": "Υ",
}
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060")
PUNCTUATION = "!?.,;:"
# "didn't" is the words "didn" and "t": a word followed by one of these and "t" is a negator.
APOSTROPHES = ("'", "\u2019")
# Signs that writers of Brahmic scripts confuse, by Unicode name within one script: short
# and long i and u, and anusvara with candrabindu; then e/ai and o/au, except in scripts
# with short and long e and o (Tamil, Telugu and the other Dravidian scripts), where
# e/ee and o/oo are the confusable pairs. A pair is skipped where a script lacks a sign.
INDIC_SIGN_PAIRS = (("VOWEL SIGN I", "VOWEL SIGN II"), ("VOWEL SIGN U", "VOWEL SIGN UU"),
                    ("SIGN ANUSVARA", "SIGN CANDRABINDU"))
INDIC_E_O_PAIRS = (("VOWEL SIGN E", "VOWEL SIGN AI"), ("VOWEL SIGN O", "VOWEL SIGN AU"))
DRAVIDIAN_E_O_PAIRS = (("VOWEL SIGN E", "VOWEL SIGN EE"), ("VOWEL SIGN O", "VOWEL SIGN OO"))
# Signs a writer leaves out: a nukta (ड़→ड), or a halant, splitting a conjunct (विद्या→विदया).
# Adding a halant is not a slip people make: it fuses two consonants into a conjunct
# (कमल→क्मल) that neither typing nor phonetic input produces by accident.
INDIC_DROPPABLE_SIGNS = ("SIGN NUKTA", "SIGN VIRAMA")

WordEdit = Callable[[str, random.Random], str]


@dataclass(frozen=True)
class Perturbation:
    name: str
    description: str
    edit_word: WordEdit
    # Whether a word can be edited at all (e.g. confusables need Latin letters).
    applies_to: Callable[[str], bool] = lambda word: True


def _grapheme_edit(operation: Callable[[list[str], random.Random], list[str]]) -> WordEdit:
    def edit(word: str, rng: random.Random) -> str:
        return "".join(operation(graphemes(word), rng))

    return edit


def _swap(units: list[str], rng: random.Random) -> list[str]:
    if len(units) < 2:
        return units
    i = rng.randrange(len(units) - 1)
    units[i], units[i + 1] = units[i + 1], units[i]
    return units


def _drop(units: list[str], rng: random.Random) -> list[str]:
    if len(units) < 2:
        return units
    del units[rng.randrange(len(units))]
    return units


def _insert(units: list[str], rng: random.Random) -> list[str]:
    # A duplicated grapheme is a same-script insertion for every script.
    i = rng.randrange(len(units))
    units.insert(i, units[i])
    return units


def _keyboard_typo(word: str, rng: random.Random) -> str:
    positions = [i for i, char in enumerate(word) if char.lower() in KEYBOARD_NEIGHBOURS]
    i = rng.choice(positions)
    typo = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
    return word[:i] + (typo.upper() if word[i].isupper() else typo) + word[i + 1 :]


def _case(word: str, rng: random.Random) -> str:
    options = [variant for variant in (word.upper(), word.lower(), word.title(), word.swapcase()) if variant != word]
    return rng.choice(options)


def _punctuation(word: str, rng: random.Random) -> str:
    return word + rng.choice(PUNCTUATION)


def _confusable(word: str, rng: random.Random) -> str:
    positions = [i for i, char in enumerate(word) if char in CONFUSABLES]
    i = rng.choice(positions)
    return word[:i] + CONFUSABLES[word[i]] + word[i + 1 :]


def _zero_width(word: str, rng: random.Random) -> str:
    units = graphemes(word)
    i = rng.randrange(1, len(units)) if len(units) > 1 else 1
    return "".join(units[:i]) + rng.choice(ZERO_WIDTH) + "".join(units[i:])


def _indic_variants(word: str) -> list[str]:
    """Each spelling slip of a Brahmic-script ``word``: one vowel or nasal sign swapped with
    its confusable pair, or one nukta or halant (virama) dropped. Vowel signs are never
    dropped nor swapped freely: that makes other words (दिल→दल, खाना→खोना)."""
    variants: list[str] = []
    for i, (char, name) in enumerate(char_names(word)):
        if " SIGN " not in name:
            continue
        partner = _confusable_signs(_script(name)).get(char)
        if partner:
            variants.append(word[:i] + partner + word[i + 1 :])
        elif name.endswith(INDIC_DROPPABLE_SIGNS):
            variants.append(word[:i] + word[i + 1 :])
    return variants


def _script(sign_name: str) -> str:
    """The script of a sign from its Unicode name: "BENGALI VOWEL SIGN I" -> "BENGALI"."""
    return sign_name.partition(" SIGN ")[0].removesuffix(" VOWEL")


@cache
def _confusable_signs(script: str) -> dict[str, str]:
    """Each sign of ``script`` that is confused with another, mapped to that other sign;
    looked up once per script."""
    # Scripts with short and long e (Tamil, Telugu) confuse e/ee and o/oo.
    dravidian = all(_sign(script, name) for name in ("VOWEL SIGN E", "VOWEL SIGN EE"))
    partners: dict[str, str] = {}
    for first, second in INDIC_SIGN_PAIRS + (DRAVIDIAN_E_O_PAIRS if dravidian else INDIC_E_O_PAIRS):
        a, b = _sign(script, first), _sign(script, second)
        if a and b:
            partners |= {a: b, b: a}
    return partners


def _sign(script: str, name: str) -> str | None:
    try:
        return unicodedata.lookup(f"{script} {name}")
    except KeyError:
        return None


def _indic_noise(word: str, rng: random.Random) -> str:
    return rng.choice(_indic_variants(word))


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("keyboard_typo", "a Latin letter replaced by a QWERTY neighbour", _keyboard_typo,
                     lambda w: any(c.lower() in KEYBOARD_NEIGHBOURS for c in w)),
        Perturbation("char_swap", "two adjacent grapheme clusters swapped", _grapheme_edit(_swap),
                     lambda w: len(set(graphemes(w))) > 1),
        Perturbation("char_drop", "a grapheme cluster deleted", _grapheme_edit(_drop), lambda w: len(graphemes(w)) > 1),
        Perturbation("char_insert", "a grapheme cluster repeated", _grapheme_edit(_insert)),
        Perturbation("case", "a word's letter case changed", _case, lambda w: w.upper() != w.lower()),
        Perturbation("punctuation", "punctuation added after a word", _punctuation),
        Perturbation("whitespace", "a space doubled, or turned into a tab or newline", lambda w, rng: w),
        Perturbation("confusables", "a Latin letter replaced by a Cyrillic or Greek look-alike", _confusable,
                     lambda w: any(c in CONFUSABLES for c in w)),
        Perturbation("zero_width", "a zero-width space, joiner or non-joiner inserted in a word", _zero_width),
        Perturbation("indic_noise", "Brahmic-script slip: a vowel sign swapped with its confusable pair (i/ii, u/uu, "
                     "e/ai or e/ee, o/au or o/oo) or anusvara with candrabindu, a nukta or halant dropped",
                     _indic_noise, lambda w: bool(_indic_variants(w))),
    )
}
WHITESPACE_VARIANTS = ("  ", "\t", "\n", "   ")


def perturb(
    text: str,
    family: str,
    *,
    rate: float = 0.1,
    seed: int = 0,
    protected: Iterable[str] = (),
    protect_negation_and_identity: bool = True,
) -> str:
    """``text`` with the perturbation ``family`` applied to a share ``rate`` of its words.

    Words in ``protected`` are left alone, and so, unless ``protect_negation_and_identity``
    is false, are the negators and identity-term words of every lexicon language
    (:func:`default_protected_words`) and English negative contractions ("didn't").
    Returns ``text`` unchanged when no word is eligible (e.g. confusables on Devanagari);
    callers count such cases as not applicable.
    """
    if family not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {family!r}; choose from {', '.join(PERTURBATIONS)}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"perturbation rate must be in (0, 1]; got {rate}")
    rng = random.Random(f"{seed}\x00{family}\x00{text}")
    if family == "whitespace":
        return _perturb_whitespace(text, rate, rng)
    perturbation = PERTURBATIONS[family]
    spans = word_spans(text)
    kept = _protected_spans(text, spans, protected, protect_negation_and_identity)
    eligible = [span for span in spans if span not in kept and perturbation.applies_to(text[span[0]:span[1]])]
    if not eligible:
        return text
    chosen = rng.sample(eligible, max(1, round(rate * len(eligible))))
    return replace_spans(text, {span: perturbation.edit_word(text[span[0]:span[1]], rng) for span in chosen})


def _protected_spans(
    text: str, spans: list[tuple[int, int]], protected: Iterable[str], negation_and_identity: bool
) -> set[tuple[int, int]]:
    """The spans of the words that ``perturb`` leaves alone."""
    words = {word.casefold() for word in protected} | (default_protected_words() if negation_and_identity else set())
    kept = {span for span in spans if text[span[0]:span[1]].casefold() in words}
    return kept | _contraction_spans(text, spans) if negation_and_identity else kept


@cache
def default_protected_words() -> frozenset[str]:
    """The negators and the words of the identity terms of every lexicon language,
    casefolded ("my brother" gives "my" and "brother"): editing them can flip the label or
    hide the group a text speaks of."""
    words: set[str] = set()
    for language in available_languages():
        lexicon = load_lexicon(language)
        for phrase in (*lexicon.negators, *lexicon.identity_terms()):
            words.update(WORD.findall(phrase.casefold()))
    return frozenset(words)


def _contraction_spans(text: str, spans: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The stem and the "t" of each negative contraction ("didn't": "didn" and "t")."""
    found: set[tuple[int, int]] = set()
    for stem, tail in itertools.pairwise(spans):
        if text[stem[1]:tail[0]] in APOSTROPHES and text[tail[0]:tail[1]].casefold() == "t":
            found |= {stem, tail}
    return found


def _perturb_whitespace(text: str, rate: float, rng: random.Random) -> str:
    spaces = [i for i, char in enumerate(text) if char == " "]
    if not spaces:
        return text
    chosen = rng.sample(spaces, max(1, round(rate * len(spaces))))
    return replace_spans(text, {(i, i + 1): rng.choice(WHITESPACE_VARIANTS) for i in chosen})


