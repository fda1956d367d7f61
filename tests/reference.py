"""Independent float64 references: the documented formulas as plain per-tensor loops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Snapshot = Sequence[Tensor]


def _f64(snapshot: Snapshot) -> list[Tensor]:
    return [t.detach().double().cpu() for t in snapshot]


def ema_reference(snapshots: Sequence[Snapshot], beta: Callable[[int], float]) -> list[Tensor]:
    """avg_1 = w_1; avg_{n+1} = beta(n) * avg_n + (1 - beta(n)) * w_{n+1}."""
    avg = _f64(snapshots[0])
    for n, snapshot in enumerate(snapshots[1:], start=1):
        b = beta(n)
        avg = [b * a + (1.0 - b) * w for a, w in zip(avg, _f64(snapshot))]
    return avg


def mean_reference(snapshots: Sequence[Snapshot]) -> list[Tensor]:
    stacked = zip(*[_f64(s) for s in snapshots])
    return [torch.stack(parts).mean(dim=0) for parts in stacked]


def assert_close_to_reference(actual: Sequence[Tensor], expected: Sequence[Tensor], rtol: float, atol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=atol)
