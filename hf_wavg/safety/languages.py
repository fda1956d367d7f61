"""Which lexicon language a text is written in, so that each text is matched with its own
language's lexicon only (a Hindi text must not also yield Marathi counterfactuals because
the two share the Devanagari script).

The script decides (the Unicode script of most of the text's letters, against the script of
each lexicon's templates); where several configured languages share that script, common
function words decide, and a text that holds none of them is left unassigned rather than
guessed.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from functools import cache

from hf_wavg.safety.counterfactuals import template_sets
from hf_wavg.safety.lexicons import load_lexicon
from hf_wavg.safety.text import WORD

# Frequent words that tell apart languages sharing a script (Hindi and Marathi in
# Devanagari); words common to both (e.g. "न") are left out.
FUNCTION_WORDS: dict[str, frozenset[str]] = {
    "hi": frozenset(["है", "हैं", "था", "थी", "थे", "और", "में", "का", "की", "के", "को", "से", "नहीं", "यह", "वह", "भी", "तो", "पर", "ही", "हम", "मैं", "बहुत"]),
    "mr": frozenset(["आहे", "आहेत", "होता", "होती", "होते", "आणि", "मी", "ते", "ती", "नाही", "चा", "ची", "चे", "ला", "मध्ये", "पण", "खूप", "हे", "तो", "आम्ही"]),
}


def script_of(text: str) -> str | None:
    """The Unicode script (first word of the character names: LATIN, DEVANAGARI, ...) of
    most of ``text``'s letters; None without letters."""
    scripts = Counter(unicodedata.name(char, "?").split()[0] for char in text if char.isalpha())
    return scripts.most_common(1)[0][0] if scripts else None


@cache
def lexicon_script(language: str) -> str | None:
    """The script of a lexicon, read off its own templates."""
    return script_of(" ".join(text for s in template_sets(load_lexicon(language)) for text in s.variants.values()))


def detect_language(text: str, languages: tuple[str, ...]) -> str | None:
    """The one language of ``languages`` that ``text`` is written in, or None when its
    script matches none of them, or several and the function words do not tell them apart."""
    script = script_of(text)
    candidates = [language for language in languages if lexicon_script(language) == script]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    words = Counter(WORD.findall(text))
    hits = {language: sum(words[w] for w in FUNCTION_WORDS.get(language, ())) for language in candidates}
    ranked = sorted(hits.items(), key=lambda item: -item[1])
    return ranked[0][0] if ranked[0][1] > ranked[1][1] else None
