"""Task metrics that need no download: the default ``compute_metrics`` of the demo and of
the post-hoc tools (any ``evaluate`` module can replace them)."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (over the classes present in the labels) of argmax predictions."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, labels = np.argmax(logits, axis=-1), np.asarray(prediction.label_ids)
    f1s = []
    for cls in np.unique(labels):
        tp = np.sum((predicted == cls) & (labels == cls))
        precision = tp / max(np.sum(predicted == cls), 1)
        recall = tp / max(np.sum(labels == cls), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1s))}
