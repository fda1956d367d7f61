"""The greedy character attack: it breaks a model that one word decides wherever that word
stands, never spends more than its query budget, attacks all examples in lockstep, and is
deterministic for a seed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hf_wavg.safety import AttackResult, CallableClassifier, greedy_char_attack
from tests.safety.safety_models import constant_model, keyword_model

TEXTS = ["the film was excellent and moving", "an excellent cast", "excellent", "dull and long"]
LABELS = [1, 1, 1, 0]
# The budget the suite attacks with by default (SafetyConfig.safety_query_budget).
SUITE_BUDGET = 30
FILLER = ["the", "plot", "of", "this", "film", "was", "slow", "at", "times", "but", "the", "cast", "and", "the", "music", "carry", "it", "through", "to", "an", "end"]


def long_text(length: int, position: int) -> str:
    """``length`` words, "excellent" (the word a keyword model decides by) at ``position``."""
    return " ".join("excellent" if i == position else FILLER[i % len(FILLER)] for i in range(length))


def attack_keyword_model(text: str, seed: int) -> AttackResult:
    classifier = CallableClassifier(keyword_model("excellent"))
    return greedy_char_attack(classifier, [text], [1], query_budget=SUITE_BUDGET, seed=seed)[0]


def counting_batches(model: Callable[[list[str]], np.ndarray]) -> tuple[Callable[[list[str]], np.ndarray], list[int]]:
    """``model``, and the list its calls append their batch sizes to."""
    batches: list[int] = []

    def predict(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        return model(texts)

    return predict, batches


def test_attack_breaks_a_one_word_model_within_budget() -> None:
    classifier = CallableClassifier(keyword_model("excellent"))
    results = greedy_char_attack(classifier, TEXTS, LABELS, query_budget=25)
    assert [r.originally_correct for r in results] == [True, True, True, True]
    assert [r.success for r in results[:3]] == [True, True, True]
    for result in results[:3]:
        assert "excellent" not in result.adversarial_text.split()
        assert result.edited_words == 1
    assert not results[3].success  # nothing turns a negative text positive here
    assert all(r.queries <= 25 for r in results)


def test_attack_fails_on_a_constant_model_and_respects_the_budget() -> None:
    for budget in (1, 5, 17):
        classifier = CallableClassifier(constant_model)
        results = greedy_char_attack(classifier, TEXTS[:3], LABELS[:3], query_budget=budget)
        assert not any(r.success for r in results)
        assert all(r.queries <= budget for r in results)
        # The classifier counts every distinct text it was asked about: an upper bound check.
        assert classifier.num_queries <= budget * 3


def test_misclassified_examples_are_not_attacked() -> None:
    results = greedy_char_attack(CallableClassifier(constant_model), ["bad"], [0], query_budget=10)
    assert not results[0].originally_correct and not results[0].success and results[0].queries == 1


def test_a_deciding_word_beyond_the_ranking_share_is_broken_within_the_suite_budget() -> None:
    # Ranking every one of 30 or 60 words would take the whole budget: a random 14 are
    # ranked and about 4 unranked ones attacked next, so the deciding word is reached for
    # about 18 / length of the seeds (each run deterministic); least is half of that.
    for length, position, least in ((30, 21, 6), (60, 59, 3)):
        results = [attack_keyword_model(long_text(length, position), seed) for seed in range(20)]
        assert all(r.queries <= SUITE_BUDGET for r in results)
        broken = [r for r in results if r.success]
        assert len(broken) >= least, (length, position, len(broken))
        for result in broken:
            pairs = zip(long_text(length, position).split(), result.adversarial_text.split(), strict=True)
            assert [i for i, (before, after) in enumerate(pairs) if before != after] == [position]


def test_every_word_can_be_reached() -> None:
    for position in range(30):
        assert any(attack_keyword_model(long_text(30, position), seed).success for seed in range(20)), position


def test_the_budget_is_a_hard_limit_and_examples_advance_in_lockstep() -> None:
    texts = [long_text(length, length - 1) for length in (1, 2, 7, 30, 60)] + ["dull and long", "excellent film"]
    labels = [1, 1, 1, 1, 1, 0, 1]
    for model in (keyword_model("excellent"), constant_model, keyword_model("never")):
        for budget in (1, 2, 3, 10, 30, 31):
            predict, batches = counting_batches(model)
            classifier = CallableClassifier(predict)
            results = greedy_char_attack(classifier, texts, labels, query_budget=budget, candidates_per_word=3)
            assert all(r.queries <= budget for r in results), [r.queries for r in results]
            assert classifier.num_queries <= budget * len(texts)
            # One batch for the originals, one for ranking, one per attack step (each step
            # spends a query of every example still running), whatever the number of texts.
            assert len(batches) <= 2 + budget - 1 - (budget - 1) // 2


def test_results_are_deterministic_for_a_seed() -> None:
    texts = [long_text(30, 21), long_text(60, 59), *TEXTS]
    labels = [1, 1, *LABELS]

    def run(seed: int) -> list[AttackResult]:
        classifier = CallableClassifier(keyword_model("excellent"))
        return greedy_char_attack(classifier, texts, labels, query_budget=SUITE_BUDGET, seed=seed)

    assert run(3) == run(3)
    assert any(run(seed) != run(3) for seed in range(4, 8))
