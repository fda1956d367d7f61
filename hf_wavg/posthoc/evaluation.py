"""Score a classifier's current weights on labelled texts: task metrics (accuracy and
macro-F1 by default, any ``evaluate`` module or Trainer-style ``compute_metrics`` on request)
and, with a :class:`~hf_wavg.safety.SafetyConfig`, the safety suite as ``safety/<metric>``.
Soups and WiSE-FT call it once per candidate set of weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn
from transformers import EvalPrediction

from hf_wavg.safety.catalog import greater_is_better  # noqa: F401  (part of this module's API)
from hf_wavg.safety.classifiers import TransformersClassifier
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.suite import SafetySuite
from hf_wavg.task_metrics import classification_metrics

ComputeMetrics = Callable[[EvalPrediction], dict[str, float]]

def _task_metric_fn(metric: Any) -> ComputeMetrics:
    """``metric``: None (accuracy and macro-F1), a ``compute_metrics`` callable, an
    ``evaluate`` module (or combination), or an ``evaluate.load`` name or local path."""
    if metric is None:
        return classification_metrics
    if isinstance(metric, str):
        import evaluate

        try:
            metric = evaluate.load(metric)
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise ValueError(
                f"evaluate could not load the metric {metric!r} ({error}). Offline, pass the path of a local "
                "metric script, an evaluate module, or a compute_metrics function."
            ) from error
    if hasattr(metric, "compute"):
        module = metric
        return lambda p: module.compute(predictions=np.asarray(p.predictions).argmax(-1), references=p.label_ids)
    if callable(metric):
        return metric
    raise TypeError(f"metric must be None, a name, an evaluate module or a callable; got {type(metric).__name__}")


class ModelEvaluator:
    """Evaluates whatever weights a model holds when called: ``evaluator(model) -> metrics``.

    Args:
        texts, labels: the labelled validation texts (``from_dataset`` takes them from columns).
        tokenizer: the model's tokenizer.
        metric: see :func:`_task_metric_fn`; its keys are reported as they come.
        safety_config: also run the safety suite (on the same texts, labels and ``groups``).
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        tokenizer: Any,
        metric: Any = None,
        safety_config: SafetyConfig | None = None,
        groups: Sequence[str] | None = None,
        batch_size: int = 64,
        max_length: int = 128,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("no texts to evaluate on")
        self.texts, self.labels, self.groups = list(texts), np.asarray(labels, dtype=np.int64), groups
        self.tokenizer = tokenizer
        self.compute_metrics = _task_metric_fn(metric)
        self.suite = SafetySuite(safety_config) if safety_config is not None else None
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def from_dataset(cls, dataset: Any, tokenizer: Any, text_column: str = "text", label_column: str = "label",
                     group_column: str | None = None, **kwargs: Any) -> ModelEvaluator:
        for column in (text_column, label_column, group_column):
            if column is not None and column not in dataset.column_names:
                raise ValueError(f"column {column!r} is not in the dataset; its columns are {dataset.column_names}")
        groups = [str(g) for g in dataset[group_column]] if group_column else None
        return cls(list(dataset[text_column]), list(dataset[label_column]), tokenizer, groups=groups, **kwargs)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        classifier = TransformersClassifier(model, self.tokenizer, self.batch_size, self.max_length)
        probabilities = classifier.predict_proba(self.texts)
        metrics = {k: float(v) for k, v in self.compute_metrics(EvalPrediction(probabilities, self.labels)).items()}
        if self.suite is not None:
            # The same classifier: the suite reuses the predictions on the unperturbed texts.
            result = self.suite.evaluate_classifier(classifier, self.texts, self.labels.tolist(), self.groups)
            metrics.update({f"safety/{key}": value for key, value in result.metrics.items()})
        return metrics
