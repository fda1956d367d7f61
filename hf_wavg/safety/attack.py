"""A black-box greedy character-level attack under a query budget, in the spirit of
DeepWordBug (Gao et al. 2018): rank words by leave-one-out importance, then edit the most
important words one at a time (swap, substitute, delete or insert one grapheme cluster),
keeping the edit that lowers the true class's probability most, until the prediction flips
or the budget is spent. Ranking spends half the budget at most: a longer text ranks a
random subset of its words, and its unranked words are tried after the ranked words that
mattered, in random order, so that any word can be attacked. All examples advance in
lockstep, so each step is one batch."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hf_wavg.safety.classifiers import CachedClassifier
from hf_wavg.safety.text import graphemes, is_latin_letter, replace_spans, word_spans


@dataclass
class AttackResult:
    text: str
    label: int
    adversarial_text: str
    originally_correct: bool
    success: bool
    queries: int
    edited_words: int


@dataclass
class _State:
    text: str
    label: int
    spans: list[tuple[int, int]]
    edits: dict[tuple[int, int], str] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    next_word: int = 0
    queries: int = 1  # the unperturbed query
    true_prob: float = 1.0
    done: bool = False
    success: bool = False

    def current(self) -> str:
        return replace_spans(self.text, self.edits)


def _candidates(word: str, rng: random.Random, count: int) -> list[str]:
    """Up to ``count`` distinct one-grapheme edits of ``word``."""
    units = graphemes(word)
    latin = any(is_latin_letter(char) for char in word)
    alphabet = list(string.ascii_lowercase) if latin else sorted(set(units)) or ["x"]
    out: list[str] = []
    for _ in range(count * 4):
        kind = rng.choice(("swap", "substitute", "delete", "insert"))
        edited = list(units)
        i = rng.randrange(len(units))
        if kind == "swap" and len(units) > 1:
            j = min(i + 1, len(units) - 1) if i + 1 < len(units) else i - 1
            edited[i], edited[j] = edited[j], edited[i]
        elif kind == "substitute":
            edited[i] = rng.choice(alphabet)
        elif kind == "delete" and len(units) > 1:
            del edited[i]
        else:
            edited.insert(i, rng.choice(alphabet))
        candidate = "".join(edited)
        if candidate != word and candidate not in out:
            out.append(candidate)
        if len(out) == count:
            break
    return out


def greedy_char_attack(
    classifier: CachedClassifier,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    query_budget: int = 50,
    candidates_per_word: int = 4,
    max_edit_fraction: float = 0.3,
    seed: int = 0,
) -> list[AttackResult]:
    """Attack each (text, label); the model is queried at most ``query_budget`` times per
    example, the unperturbed query included. Examples the model already gets wrong are not
    attacked (they count as errors under attack)."""
    if query_budget < 1:
        raise ValueError(f"query_budget must be >= 1; got {query_budget}")
    rng = random.Random(seed)
    states = [_State(text, int(label), word_spans(text)) for text, label in zip(texts, labels)]
    probs = classifier.predict_proba([s.text for s in states])
    originally_correct = [int(np.argmax(row)) == state.label for state, row in zip(states, probs)]
    for state, row, correct in zip(states, probs, originally_correct):
        state.true_prob = float(row[state.label])
        state.done = not correct or not state.spans

    _rank_words(classifier, states, query_budget, rng)
    while True:
        batch: list[tuple[_State, tuple[int, int], str]] = []
        for state in states:
            if state.done:
                continue
            limit = max(1, int(max_edit_fraction * len(state.spans)))
            if state.next_word >= len(state.order) or len(state.edits) >= limit or state.queries >= query_budget:
                state.done = True
                continue
            span = state.spans[state.order[state.next_word]]
            state.next_word += 1
            count = min(candidates_per_word, query_budget - state.queries)
            for word in _candidates(state.text[span[0]:span[1]], rng, count):
                batch.append((state, span, word))
        if not batch:
            break
        texts_now = [replace_spans(s.text, {**s.edits, span: word}) for s, span, word in batch]
        batch_probs = classifier.predict_proba(texts_now)
        best: dict[int, tuple[float, tuple[int, int], str, bool]] = {}
        for (state, span, word), row in zip(batch, batch_probs):
            state.queries += 1
            flipped = int(np.argmax(row)) != state.label
            key = id(state)
            score = float(row[state.label])
            if key not in best or (flipped, -score) > (best[key][3], -best[key][0]):
                best[key] = (score, span, word, flipped)
        for state in states:
            choice = best.get(id(state))
            if choice is None:
                continue
            score, span, word, flipped = choice
            if flipped or score < state.true_prob:
                state.edits[span] = word
                state.true_prob = score
            if flipped:
                state.success = state.done = True

    return [
        AttackResult(s.text, s.label, s.current(), correct, s.success, s.queries, len(s.edits))
        for s, correct in zip(states, originally_correct)
    ]


def _rank_words(classifier: CachedClassifier, states: list[_State], query_budget: int, rng: random.Random) -> None:
    """Set each state's attack order from the leave-one-out importance of its words: the
    drop in the true class's probability when a word is deleted. Half the budget at most
    goes to ranking, so a text with more words ranks a random subset of them. The order is
    the ranked words whose deletion lowered that probability, most important first, then
    the unranked words in random order, then the other ranked words: a word whose deletion
    did not help is a worse bet than one never tried."""
    share = max(0, (query_budget - 1) // 2)
    active = [state for state in states if not state.done]
    samples = [_sample(len(state.spans), share, rng) for state in active]
    requests = [(state, i) for state, sample in zip(active, samples) for i in sample]
    probs = classifier.predict_proba([replace_spans(s.text, {s.spans[i]: ""}) for s, i in requests])
    importance: dict[int, dict[int, float]] = {id(state): {} for state in active}
    for (state, i), row in zip(requests, probs):
        state.queries += 1
        importance[id(state)][i] = state.true_prob - float(row[state.label])
    for state in active:
        scores = importance[id(state)]
        unranked = [i for i in range(len(state.spans)) if i not in scores]
        rng.shuffle(unranked)
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        state.order = [i for i in ranked if scores[i] > 0] + unranked + [i for i in ranked if scores[i] <= 0]


def _sample(words: int, share: int, rng: random.Random) -> list[int]:
    """The indices of the words to rank: all of them when they fit in ``share`` queries."""
    return list(range(words)) if words <= share else rng.sample(range(words), share)
