"""A small English + Hindi sentiment sample that the project writes itself.

Sentences come from templates crossed with product nouns and polar adjectives, with
negated templates that flip the label, so the task is not pure keyword spotting. Hindi
adjectives and verbs agree with the noun's grammatical gender.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SAMPLE_LANGUAGES = ("en", "hi")

ENGLISH_NOUNS = ["phone", "movie", "restaurant", "book", "hotel", "laptop", "service", "camera", "song", "delivery"]
ENGLISH_ADJECTIVES = {
    1: ["excellent", "wonderful", "great", "delightful", "reliable", "fantastic", "pleasant", "superb"],
    0: ["terrible", "awful", "disappointing", "broken", "boring", "horrible", "useless", "poor"],
}
ENGLISH_TEMPLATES = [
    ("The {noun} was {adj}.", False),
    ("I found the {noun} {adj}.", False),
    ("Honestly, the {noun} is {adj}.", False),
    ("My friend said the {noun} was {adj}, and I agree.", False),
    ("The {noun} was not {adj}.", True),
    ("I would not call the {noun} {adj}.", True),
]

# (noun, grammatical gender)
HINDI_NOUNS = [("फ़ोन", "m"), ("फ़िल्म", "f"), ("होटल", "m"), ("किताब", "f"), ("खाना", "m"), ("सेवा", "f"),
               ("कैमरा", "m"), ("गाना", "m"), ("कहानी", "f"), ("गाड़ी", "f")]
# (masculine form, feminine form)
HINDI_ADJECTIVES = {
    1: [("बहुत अच्छा", "बहुत अच्छी"), ("शानदार", "शानदार"), ("बेहतरीन", "बेहतरीन"), ("लाजवाब", "लाजवाब"),
        ("उम्दा", "उम्दा")],
    0: [("बहुत बुरा", "बहुत बुरी"), ("बेकार", "बेकार"), ("घटिया", "घटिया"), ("निराशाजनक", "निराशाजनक"),
        ("ख़राब", "ख़राब")],
}
HINDI_VERBS = {"was": ("था", "थी"), "turned_out": ("निकला", "निकली")}
HINDI_TEMPLATES = [
    ("यह {noun} {adj} है।", False),
    ("{noun} {adj} {was}।", False),
    ("मुझे लगा कि {noun} {adj} है।", False),
    ("सच कहूँ तो {noun} {adj} {turned_out}।", False),
    ("यह {noun} {adj} नहीं है।", True),
    ("{noun} {adj} नहीं {was}।", True),
]

LABEL_NAMES = ["negative", "positive"]


def english_rows() -> list[dict[str, str]]:
    rows = []
    for template, negated in ENGLISH_TEMPLATES:
        for polarity, adjectives in ENGLISH_ADJECTIVES.items():
            for noun in ENGLISH_NOUNS:
                for adj in adjectives:
                    label = 1 - polarity if negated else polarity
                    rows.append({"text": template.format(noun=noun, adj=adj), "label": LABEL_NAMES[label],
                                 "language": "en"})
    return rows


def hindi_rows() -> list[dict[str, str]]:
    rows = []
    for template, negated in HINDI_TEMPLATES:
        for polarity, adjectives in HINDI_ADJECTIVES.items():
            for noun, gender in HINDI_NOUNS:
                form = 0 if gender == "m" else 1
                for adj in adjectives:
                    label = 1 - polarity if negated else polarity
                    text = template.format(noun=noun, adj=adj[form], was=HINDI_VERBS["was"][form],
                                           turned_out=HINDI_VERBS["turned_out"][form])
                    rows.append({"text": text, "label": LABEL_NAMES[label], "language": "hi"})
    return rows


def sample_rows(per_language: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """``per_language`` sentences of each language, drawn without replacement, shuffled."""
    rng = random.Random(seed)
    rows = rng.sample(english_rows(), per_language) + rng.sample(hindi_rows(), per_language)
    rng.shuffle(rows)
    return rows


def write_sample(path: str | Path, per_language: int = 240, seed: int = 0) -> Path:
    """Write the sample as CSV with columns ``text,label,language``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "language"])
        writer.writeheader()
        writer.writerows(sample_rows(per_language, seed))
    return path
