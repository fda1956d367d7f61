"""Adversarial robustness: how often, and how cheaply, a black-box attack flips predictions."""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import adversarial_robustness


class AdversarialRobustness(metric_base.SafetyMetric):
    measure = staticmethod(adversarial_robustness)
    metric_description = (
        "Rows are attacked examples (see hf_wavg.safety.attack). Reports, TextAttack-style, num_attacked (originally "
        "right), num_skipped (originally wrong), num_successes, attack_success_rate (successes over attacked, "
        "Clopper-Pearson interval), accuracy_under_attack (over all), mean_queries and mean_edited_words."
    )
    metric_citation = "Gao et al. 2018, Black-box Generation of Adversarial Text Sequences to Evade Deep Learning Classifiers."
    metric_features: ClassVar[dict[str, Any]] = {
        "originally_correct": datasets.Value("bool"),
        "attack_success": datasets.Value("bool"),
        "queries": datasets.Value("int64"),
        "edited_words": datasets.Value("int64"),
    }
