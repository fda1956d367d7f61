"""The models the safety suite queries: class probabilities for a list of texts.

``CachedClassifier`` remembers each distinct text's probabilities, so the unperturbed
texts are run once per suite, however many metrics read them; it also counts model
queries. One instance belongs to one set of weights: build a new one after swapping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hf_wavg.safety.text import WORD


class CachedClassifier(ABC):
    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}
        self.num_queries = 0
        self.num_truncated = 0

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities, shape (len(texts), num_labels), for texts in any order."""
        missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        if missing:
            self.num_queries += len(missing)
            for text, row in zip(missing, self._predict(missing)):
                self._cache[text] = row
        if not texts:
            return np.zeros((0, 0), dtype=np.float64)
        return np.stack([self._cache[text] for text in texts])

    @abstractmethod
    def _predict(self, texts: list[str]) -> np.ndarray: ...


class CallableClassifier(CachedClassifier):
    """Wraps ``fn(texts) -> probabilities``; handy for tests and non-transformers models."""

    def __init__(self, fn: Callable[[list[str]], np.ndarray]) -> None:
        super().__init__()
        self.fn = fn

    def _predict(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.fn(texts), dtype=np.float64)


class TransformersClassifier(CachedClassifier):
    """A sequence-classification model and its tokenizer, run in eval mode and batches of
    similar lengths (less padding). Texts longer than ``max_length`` tokens are truncated
    and counted in ``num_truncated``."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 64, max_length: int = 128) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def _predict(self, texts: list[str]) -> np.ndarray:
        # Tokenising to max_length + 1 tells which texts the real limit truncates.
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]]
        self.num_truncated += sum(length > self.max_length for length in lengths)
        order = np.argsort(lengths, kind="stable")
        out: list[np.ndarray | None] = [None] * len(texts)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    index = order[start : start + self.batch_size]
                    batch = self.tokenizer(
                        [texts[i] for i in index], padding=True, truncation=True,
                        max_length=self.max_length, return_tensors="pt",
                    ).to(device)
                    logits = self.model(**batch).logits.float()
                    probs = torch.softmax(logits, dim=-1).cpu().double().numpy()
                    for i, row in zip(index, probs):
                        out[i] = row
        finally:
            self.model.train(was_training)
        return np.stack(out)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ScoredText:
    """A text's token ids, each token's log-probability given the ones before it, and each
    token's first character in the text (None for tokenizers without offsets)."""

    ids: np.ndarray
    log_probs: np.ndarray
    starts: np.ndarray | None


def token_log_probs(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                    max_length: int = 128) -> list[ScoredText]:
    """Each text's tokens scored under a causal LM (conditioned on BOS when the tokenizer
    has one; without BOS the first token has no context and gets NaN)."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    offsets = bool(getattr(tokenizer, "is_fast", False))
    out: list[ScoredText] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                encoded = [tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                                     return_offsets_mapping=offsets) for text in chunk]
                ids = [row["input_ids"] for row in encoded]
                prefix = [] if bos is None else [bos]
                rows = [prefix + row for row in ids]
                width = max(len(row) for row in rows)
                input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
                mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                scores = logp.cpu().double().numpy()
                for row, text_ids, values, enc in zip(rows, ids, scores, encoded):
                    scored = values[: len(row) - 1]
                    starts = np.array([begin for begin, _ in enc["offset_mapping"]]) if offsets else None
                    out.append(ScoredText(np.asarray(text_ids), scored if bos is not None else
                                          np.concatenate([[np.nan], scored]), starts))
    finally:
        model.train(was_training)
    return out


def sequence_log_likelihoods(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                             max_length: int = 128) -> np.ndarray:
    """Sum of token log-probabilities of each text under a causal LM (the first token is
    conditioned on BOS when the tokenizer has one, and left out otherwise)."""
    return np.array([np.nansum(t.log_probs) for t in token_log_probs(model, tokenizer, texts, batch_size, max_length)])


def shared_tail_length(first: str, second: str) -> int:
    """Characters that end both texts alike and start at a word boundary in both: what
    follows the identity term ("Harleen is kind." / "Jasleen is kind." share " is kind.",
    not the names' common "leen")."""
    length = 0
    while length < min(len(first), len(second)) and first[-1 - length] == second[-1 - length]:
        length += 1

    def at_boundary(text: str) -> bool:
        begin = len(text) - length
        return begin == 0 or not (_is_word_char(text[begin]) and _is_word_char(text[begin - 1]))

    while length > 0 and not (at_boundary(first) and at_boundary(second)):
        length -= 1
    return length


def _is_word_char(char: str) -> bool:
    return WORD.fullmatch(char) is not None


def shared_suffix_log_likelihoods(
    scored: dict[str, ScoredText], first: str, second: str
) -> tuple[float, float] | None:
    """The log-likelihood of the tokens two sentences share at their end, under each
    sentence's own (differing) beginning: the causal-LM form of CrowS-Pairs' scoring of
    unmodified tokens. The tokens before the identity term are the same in both sentences
    and score the same, so what is compared is how each identity term makes the rest of
    the sentence more or less likely, not how likely the terms themselves are (a long name
    would otherwise always lose). Only tokens that start after the terms end (at a word
    boundary, where the tokenizer gives offsets) count, so two terms' common endings are
    never scored. None when the sentences share no such token."""
    a, b = scored[first], scored[second]
    shared = 0
    limit = min(len(a.ids), len(b.ids)) - 1  # the sentences differ, so something precedes the suffix
    while shared < limit and a.ids[len(a.ids) - 1 - shared] == b.ids[len(b.ids) - 1 - shared]:
        shared += 1
    if a.starts is not None and b.starts is not None:
        tail = shared_tail_length(first, second)
        in_tail = min(int((a.starts >= len(first) - tail).sum()), int((b.starts >= len(second) - tail).sum()))
        shared = min(shared, in_tail)
    if shared == 0:
        return None
    return float(a.log_probs[-shared:].sum()), float(b.log_probs[-shared:].sum())
