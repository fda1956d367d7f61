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


def sequence_log_likelihoods(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                             max_length: int = 128) -> np.ndarray:
    """Sum of token log-probabilities of each text under a causal LM (the first token is
    conditioned on BOS when the tokenizer has one)."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    scores = np.zeros(len(texts))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                ids = [tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for text in chunk]
                if bos is not None:
                    ids = [[bos, *row] for row in ids]
                width = max(len(row) for row in ids)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=device)
                mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                scores[start : start + len(chunk)] = (logp * mask[:, 1:]).sum(-1).cpu().double().numpy()
    finally:
        model.train(was_training)
    return scores
