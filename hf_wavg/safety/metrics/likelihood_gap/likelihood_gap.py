"""Counterfactual log-likelihood gap of a causal language model."""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import likelihood_gap


class LikelihoodGap(metric_base.SafetyMetric):
    measure = staticmethod(likelihood_gap)
    metric_description = (
        "Rows are sentence pairs differing only in the group term: the log-likelihood of what the two share under "
        "the first group's sentence and under its counterfactual. Reports preference_rate (share preferring the "
        "first, ties counting one half), tie_rate, mean_gap and mean_abs_gap (nats), with intervals resampling "
        "the pairs' blocks of terms and templates (two-way cluster bootstrap)."
    )
    metric_citation = "Nangia et al. 2020, CrowS-Pairs: A Challenge Dataset for Measuring Social Biases in Masked Language Models."
    metric_features: ClassVar[dict[str, Any]] = {
        "log_likelihoods": datasets.Value("float64"),
        "counterfactual_log_likelihoods": datasets.Value("float64"),
        "blocks": datasets.Value("string"),
        "templates": datasets.Value("string"),
    }
