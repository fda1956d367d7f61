"""Tiny models for unit tests."""

from __future__ import annotations

import torch
from torch import nn


class TiedLM(nn.Module):
    """Embedding and output projection share one weight; a BatchNorm; an integer buffer."""

    def __init__(self, vocab: int = 11, hidden: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(4))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(input_ids)))


def perturb_(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """One pretend optimizer step: every float parameter moves."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
