"""The models the safety suite queries: class probabilities for a list of texts.

``CachedClassifier`` remembers each distinct text's probabilities, so the unperturbed
texts are run once per suite, however many metrics read them; it also counts model
queries. One instance belongs to one set of weights: build a new one after swapping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn


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


def token_log_probs(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                    max_length: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text's token ids and the log-probability of each token given the ones before it
    under a causal LM (conditioned on BOS when the tokenizer has one; without BOS the first
    token has no context and gets NaN)."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[np.ndarray, np.ndarray]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                ids = [tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for text in chunk]
                prefix = [] if bos is None else [bos]
                rows = [prefix + row for row in ids]
                width = max(len(row) for row in rows)
                input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
                mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                logp = logp.cpu().double().numpy()
                for row, text_ids, values in zip(rows, ids, logp):
                    scored = values[: len(row) - 1]
                    out.append((np.asarray(text_ids), scored if bos is not None else np.concatenate([[np.nan], scored])))
    finally:
        model.train(was_training)
    return out


def sequence_log_likelihoods(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                             max_length: int = 128) -> np.ndarray:
    """Sum of token log-probabilities of each text under a causal LM (the first token is
    conditioned on BOS when the tokenizer has one, and left out otherwise)."""
    return np.array([np.nansum(logp) for _, logp in token_log_probs(model, tokenizer, texts, batch_size, max_length)])


def shared_suffix_log_likelihoods(
    scored: dict[str, tuple[np.ndarray, np.ndarray]], first: str, second: str
) -> tuple[float, float] | None:
    """The log-likelihood of the tokens two sentences share at their end, under each
    sentence's own (differing) beginning: the causal-LM form of CrowS-Pairs' scoring of
    unmodified tokens. The tokens before the identity term are the same in both sentences
    and score the same, so what is compared is how each identity term makes the rest of
    the sentence more or less likely, not how likely the terms themselves are (a long name
    would otherwise always lose). None when the sentences share no final token."""
    ids_a, logp_a = scored[first]
    ids_b, logp_b = scored[second]
    shared = 0
    limit = min(len(ids_a), len(ids_b)) - 1  # the sentences differ, so something precedes the suffix
    while shared < limit and ids_a[len(ids_a) - 1 - shared] == ids_b[len(ids_b) - 1 - shared]:
        shared += 1
    if shared == 0:
        return None
    return float(logp_a[-shared:].sum()), float(logp_b[-shared:].sum())
