"""Label-preserving text perturbations, each a family of noise a real user produces.

Every perturbation edits whole words chosen at random (a share ``rate`` of the eligible
words, at least one), never touches ``protected`` words (e.g. the words that carry the
label), works on grapheme clusters so Indic syllables stay well formed, and is
deterministic given ``seed``: the random generator is seeded from the seed, the family and
the text, so results do not depend on call order.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from hf_wavg.safety.text import char_names, graphemes, replace_spans, word_spans

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


def _indic_edits(word: str) -> list[Callable[[random.Random], str]]:
    """Spelling slips of Brahmic scripts: a vowel sign (matra) dropped or replaced by
    another of the same script, a nukta dropped, a halant (virama) dropped or added."""
    names = list(char_names(word))
    edits: list[Callable[[random.Random], str]] = []
    for i, (char, name) in enumerate(names):
        if "VOWEL SIGN" in name:
            edits.append(lambda rng, i=i: word[:i] + word[i + 1 :])
            siblings = [sign for sign in _block_signs(ord(char) & ~0x7F)[0] if sign != char]
            if siblings:
                edits.append(lambda rng, i=i, s=siblings: word[:i] + rng.choice(s) + word[i + 1 :])
        elif "SIGN NUKTA" in name or "SIGN VIRAMA" in name:
            edits.append(lambda rng, i=i: word[:i] + word[i + 1 :])
        elif "LETTER" in name and "VOWEL" not in name and _is_brahmic(char):
            following = names[i + 1][1] if i + 1 < len(names) else ""
            if "SIGN" not in following:
                virama = _block_signs(ord(char) & ~0x7F)[1]
                if virama:
                    edits.append(lambda rng, i=i, v=virama: word[: i + 1] + v + word[i + 1 :])
    return edits


@lru_cache(maxsize=None)
def _block_signs(block: int) -> tuple[tuple[str, ...], str | None]:
    """The common vowel signs (offsets 0x3E-0x4C of every Brahmic block) and the virama of
    the 128-code-point script block starting at ``block``; looked up once per script."""
    names = {cp: unicodedata.name(chr(cp), "") for cp in range(block, block + 0x80)}
    matras = tuple(chr(cp) for cp in range(block + 0x3E, block + 0x4D) if "VOWEL SIGN" in names[cp])
    virama = next((chr(cp) for cp, name in names.items() if "SIGN VIRAMA" in name), None)
    return matras, virama


def _is_brahmic(char: str) -> bool:
    return 0x0900 <= ord(char) < 0x0E00


def _indic_noise(word: str, rng: random.Random) -> str:
    return rng.choice(_indic_edits(word))(rng)


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
        Perturbation("indic_noise", "Brahmic-script slip: matra dropped or changed, nukta dropped, halant changed",
                     _indic_noise, lambda w: bool(_indic_edits(w))),
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
) -> str:
    """``text`` with the perturbation ``family`` applied to a share ``rate`` of its words.

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
    protected_words = {word.casefold() for word in protected}
    eligible = [
        span for span in word_spans(text)
        if text[span[0]:span[1]].casefold() not in protected_words and perturbation.applies_to(text[span[0]:span[1]])
    ]
    if not eligible:
        return text
    chosen = rng.sample(eligible, max(1, round(rate * len(eligible))))
    return replace_spans(text, {span: perturbation.edit_word(text[span[0]:span[1]], rng) for span in chosen})


def _perturb_whitespace(text: str, rate: float, rng: random.Random) -> str:
    spaces = [i for i, char in enumerate(text) if char == " "]
    if not spaces:
        return text
    chosen = rng.sample(spaces, max(1, round(rate * len(spaces))))
    return replace_spans(text, {(i, i + 1): rng.choice(WHITESPACE_VARIANTS) for i in chosen})


