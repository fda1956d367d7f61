"""Safety evaluation: counterfactual fairness (English and Indian languages), group gaps,
perturbation and adversarial robustness, calibration, each with bootstrap intervals and
each an ``evaluate`` module loadable offline (:func:`load_metric`)."""

from hf_wavg.safety.attack import AttackResult, greedy_char_attack
from hf_wavg.safety.classifiers import CachedClassifier, CallableClassifier, TransformersClassifier
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.counterfactuals import CounterfactualSet, template_sets, text_counterfactuals
from hf_wavg.safety.lexicons import available_languages, load_lexicon
from hf_wavg.safety.metric_base import METRIC_NAMES, load_metric, metric_path
from hf_wavg.safety.monitor import SafetyMonitor
from hf_wavg.safety.perturbations import PERTURBATIONS, perturb
from hf_wavg.safety.suite import SafetyResult, SafetySuite

__all__ = [
    "METRIC_NAMES",
    "PERTURBATIONS",
    "AttackResult",
    "CachedClassifier",
    "CallableClassifier",
    "CounterfactualSet",
    "SafetyConfig",
    "SafetyMonitor",
    "SafetyResult",
    "SafetySuite",
    "TransformersClassifier",
    "available_languages",
    "greedy_char_attack",
    "load_lexicon",
    "load_metric",
    "metric_path",
    "perturb",
    "template_sets",
    "text_counterfactuals",
]
