"""The default task metrics against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from hf_wavg.task_metrics import macro_f1


def f1_by_precision_and_recall(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Macro-F1 the textbook way: per class 2PR / (P + R), 0 without a true positive."""
    scores = []
    for cls in np.unique(labels):
        tp = np.sum((predicted == cls) & (labels == cls))
        precision, recall = tp / max(np.sum(predicted == cls), 1), tp / max(np.sum(labels == cls), 1)
        scores.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def test_macro_f1_is_the_textbook_one_and_its_weights_are_repetitions():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 3, 60), rng.integers(0, 4, 60)  # a class never labelled is left out
    assert macro_f1(predicted, labels)[0] == pytest.approx(f1_by_precision_and_recall(predicted, labels), rel=1e-12)
    weights = rng.integers(0, 3, (5, 60)).astype(np.float64)
    for row, value in zip(weights, macro_f1(predicted, labels, weights)):
        repeat = row.astype(int)
        kept = np.isin(np.unique(labels), labels[repeat > 0])
        expected = f1_by_precision_and_recall(np.repeat(predicted, repeat), np.repeat(labels, repeat))
        # A class absent from a resample still counts, with F1 0, over the full label set.
        assert value == pytest.approx(expected * kept.sum() / len(kept), rel=1e-12)
