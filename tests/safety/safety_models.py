"""Toy text classifiers with known behaviour, for the safety tests."""

from __future__ import annotations

import numpy as np

from hf_wavg.safety import load_lexicon
from hf_wavg.safety.text import WORD


def probabilities(positive: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - positive, positive], axis=1)


def female_terms(languages: tuple[str, ...]) -> set[str]:
    terms = set()
    for language in languages:
        family = load_lexicon(language).families["gender"]
        terms |= {t.casefold() for t in family.groups["female"]["any"]}
        terms |= {t.casefold() for t in family.free_text_groups.get("female", ())}
    return terms


def planted_gender_bias(languages: tuple[str, ...]):
    """Positive exactly when the text holds a female term: a maximally biased model."""
    terms = {f" {term} " for term in female_terms(languages)}

    def words(text: str) -> str:
        return " " + " ".join(WORD.findall(text.casefold())) + " "

    def predict(texts: list[str]) -> np.ndarray:
        return probabilities(np.array([0.95 if any(t in words(text) for t in terms) else 0.05 for text in texts]))

    return predict


def keyword_model(word: str):
    """Positive exactly when ``word`` appears as a whole word."""

    def predict(texts: list[str]) -> np.ndarray:
        return probabilities(np.array([0.9 if word in text.casefold().split() else 0.1 for text in texts]))

    return predict


def constant_model(texts: list[str]) -> np.ndarray:
    return probabilities(np.full(len(texts), 0.8))
