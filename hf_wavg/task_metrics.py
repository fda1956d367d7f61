"""Task metrics that need no download: the default ``compute_metrics`` of the demo and of
the post-hoc tools (any ``evaluate`` module can replace them)."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (over the classes present in the labels) of argmax predictions."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, labels = np.argmax(logits, axis=-1), np.asarray(prediction.label_ids)
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(macro_f1(predicted, labels)[0])}


def macro_f1(predicted: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Macro-averaged F1 over the classes present in ``labels``, under each row of ``weights``
    ((resamples, examples) multiplicities, as a bootstrap draws them; default: one row of ones).
    A class's F1 is 2 TP / (predicted + actual), the harmonic mean of precision and recall, and
    0 when it has no true positive."""
    weights = np.ones((1, len(labels))) if weights is None else weights
    scores = []
    for cls in np.unique(labels):
        tp = weights @ ((predicted == cls) & (labels == cls)).astype(np.float64)
        predicted_positive = weights @ (predicted == cls).astype(np.float64)
        actual = weights @ (labels == cls).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores.append(np.where(tp > 0, 2 * tp / (predicted_positive + actual), 0.0))
    return np.mean(scores, axis=0)
