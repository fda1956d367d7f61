"""Unicode-aware word and grapheme handling shared by counterfactuals, perturbations and
the attack. Python's ``\\w`` does not match Indic vowel signs, so words are runs of letters,
marks and digits (``regex``'s ``\\p{L}\\p{M}\\p{N}``) and characters are grapheme clusters
(``\\X``): a consonant with its matra, nukta or halant is edited as one unit."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

import regex

WORD_CHARS = r"\p{L}\p{M}\p{N}"
WORD = regex.compile(rf"[{WORD_CHARS}]+")
GRAPHEME = regex.compile(r"\X")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Start and end offsets of each word of ``text``."""
    return [match.span() for match in WORD.finditer(text)]


def graphemes(word: str) -> list[str]:
    return GRAPHEME.findall(word)


def replace_spans(text: str, replacements: dict[tuple[int, int], str]) -> str:
    """``text`` with each (start, end) span replaced; spans must not overlap."""
    pieces, cursor = [], 0
    for (start, end), new in sorted(replacements.items()):
        pieces.append(text[cursor:start])
        pieces.append(new)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def match_case(template: str, replacement: str) -> str:
    """``replacement`` in the capitalisation of ``template`` (for cased scripts)."""
    if template.isupper() and len(template) > 1:
        return replacement.upper()
    if template[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def char_names(text: str) -> Iterator[tuple[str, str]]:
    for char in text:
        yield char, unicodedata.name(char, "")


def is_latin_letter(char: str) -> bool:
    return char.isalpha() and "LATIN" in unicodedata.name(char, "")
