"""Counterfactual fairness: do a model's scores change when only an identity term does?"""

import datasets

from hf_wavg.safety.measures import counterfactual_fairness
# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base


class CounterfactualFairness(metric_base.SafetyMetric):
    measure = staticmethod(counterfactual_fairness)
    metric_description = (
        "Each row is one variant of a counterfactual set (the same sentence with the identity term of another "
        "group of the family). Reports flip_rate, mean_abs_score_change, max_abs_score_change, group_gap "
        "(highest minus lowest group mean score, worst family) and average_group_fairness (mean Wasserstein-1 "
        "distance between each group's scores and the family's pooled scores), plus num_applicable."
    )
    metric_citation = (
        "Huang et al. 2020, Reducing Sentiment Bias in Language Models via Counterfactual Evaluation. "
        "Kiritchenko and Mohammad 2018, Examining Gender and Race Bias in Two Hundred Sentiment Analysis Systems."
    )
    metric_features = {
        "set_ids": datasets.Value("int64"),
        "families": datasets.Value("string"),
        "groups": datasets.Value("string"),
        "scores": datasets.Value("float64"),
        "predictions": datasets.Value("int64"),
        "is_reference": datasets.Value("bool"),
    }
