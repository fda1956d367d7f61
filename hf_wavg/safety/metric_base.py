"""Shared base of the package's ``evaluate`` modules (``hf_wavg/safety/metrics/<name>/``):
each module declares its features and the function in :mod:`hf_wavg.safety.measures` that
computes it. Load them offline with :func:`load_metric` or ``evaluate.load(<path>)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import datasets
import evaluate

METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES = (
    "counterfactual_fairness",
    "group_gaps",
    "perturbation_robustness",
    "adversarial_robustness",
    "calibration",
    "likelihood_gap",
)
BOOTSTRAP_OPTIONS = {"confidence_level", "n_resamples", "method", "seed"}
BOOTSTRAP_DOC = """
    confidence_level (float, default 0.95), n_resamples (int, default 1000),
    method ("BCa" or "percentile", default "BCa") and seed (int, default 0) set the
    bootstrap (scipy.stats.bootstrap); every metric comes with <name>_ci_low and
    <name>_ci_high."""


class SafetyMetric(evaluate.Metric):
    """An ``evaluate.Metric`` computed by ``measure(**inputs, **options)``."""

    measure: ClassVar[Callable[..., dict[str, float]]]
    metric_features: ClassVar[dict[str, Any]]
    metric_description: ClassVar[str]
    metric_citation: ClassVar[str] = ""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.metric_description,
            citation=self.metric_citation,
            inputs_description=f"Inputs: {', '.join(self.metric_features)}.{BOOTSTRAP_DOC}",
            features=datasets.Features(self.metric_features),
        )

    def _compute(self, **kwargs: Any) -> dict[str, float]:
        # evaluate.combine hands every module every input; keep what this one takes.
        accepted = set(inspect.signature(type(self).measure).parameters) | BOOTSTRAP_OPTIONS
        return type(self).measure(**{key: value for key, value in kwargs.items() if key in accepted})


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """One of the package's metrics, loaded by path (no network); ``kwargs`` go to
    ``evaluate.load`` (e.g. ``experiment_id``)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown safety metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


def metric_path(name: str) -> str:
    return str(METRICS_DIR / name)
