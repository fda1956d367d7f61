"""Counterfactual logit pairing (Garg et al. 2019, "Counterfactual Fairness in Text
Classification through Robustness"): a training penalty lambda * mean |logits(x) -
logits(x')| where x' is x with an identity term swapped for another group's."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_wavg.safety.counterfactuals import random_counterfactual
from hf_wavg.safety.languages import detect_language


def counterfactual_texts(texts: Sequence[str], languages: tuple[str, ...], rng: random.Random) -> tuple[list[int], list[str]]:
    """Indices of the texts that hold a swappable identity term, and one counterfactual of
    each, swapped with the lexicon of the text's own language."""
    indices, counterfactuals = [], []
    for i, text in enumerate(texts):
        language = detect_language(text, languages)
        counterfactual = None if language is None else random_counterfactual(text, (language,), rng)
        if counterfactual is not None:
            indices.append(i)
            counterfactuals.append(counterfactual)
    return indices, counterfactuals


def logit_pairing_penalty(
    model: nn.Module,
    tokenizer: Any,
    inputs: dict[str, torch.Tensor],
    logits: torch.Tensor,
    languages: tuple[str, ...],
    rng: random.Random,
) -> torch.Tensor:
    """Mean absolute logit difference between the batch's examples that hold identity terms
    and their counterfactuals (zero when none does). The batch's texts are recovered by
    decoding ``input_ids``; counterfactuals are tokenised to the batch's length."""
    texts = tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
    indices, counterfactuals = counterfactual_texts(texts, languages, rng)
    if not indices:
        return logits.new_zeros(())
    encoded = tokenizer(
        counterfactuals, padding=True, truncation=True, max_length=inputs["input_ids"].shape[1], return_tensors="pt"
    ).to(logits.device)
    counterfactual_logits = model(**encoded).logits
    return (logits[indices] - counterfactual_logits).abs().mean()
