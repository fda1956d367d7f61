"""Safety evaluation: counterfactual fairness (English and Indian languages), group gaps,
perturbation and adversarial robustness, calibration, each with bootstrap intervals and
each an ``evaluate`` module loadable offline (:func:`load_metric`).

A leaf package: it imports nothing else of hf_wavg, and its names load on first use, so the
numpy-only :mod:`hf_wavg.safety.measures` (which every metric module imports) stays light.
"""

from typing import TYPE_CHECKING

from hf_wavg._lazy import lazy_exports

if TYPE_CHECKING:
    from hf_wavg.safety.attack import AttackResult, greedy_char_attack
    from hf_wavg.safety.classifiers import CachedClassifier, CallableClassifier, TransformersClassifier
    from hf_wavg.safety.config import SafetyConfig
    from hf_wavg.safety.counterfactuals import CounterfactualSet, template_sets, text_counterfactuals
    from hf_wavg.safety.lexicons import available_languages, load_lexicon
    from hf_wavg.safety.metric_base import METRIC_NAMES, load_metric, metric_path
    from hf_wavg.safety.perturbations import PERTURBATIONS, perturb
    from hf_wavg.safety.suite import SafetyResult, SafetySuite

_MODULES = {
    "hf_wavg.safety.attack": ("AttackResult", "greedy_char_attack"),
    "hf_wavg.safety.classifiers": ("CachedClassifier", "CallableClassifier", "TransformersClassifier"),
    "hf_wavg.safety.config": ("SafetyConfig",),
    "hf_wavg.safety.counterfactuals": ("CounterfactualSet", "template_sets", "text_counterfactuals"),
    "hf_wavg.safety.lexicons": ("available_languages", "load_lexicon"),
    "hf_wavg.safety.metric_base": ("METRIC_NAMES", "load_metric", "metric_path"),
    "hf_wavg.safety.perturbations": ("PERTURBATIONS", "perturb"),
    "hf_wavg.safety.suite": ("SafetyResult", "SafetySuite"),
}
__getattr__, __dir__ = lazy_exports(__name__, {name: module for module, names in _MODULES.items() for name in names})

__all__ = [
    "METRIC_NAMES",
    "PERTURBATIONS",
    "AttackResult",
    "CachedClassifier",
    "CallableClassifier",
    "CounterfactualSet",
    "SafetyConfig",
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
