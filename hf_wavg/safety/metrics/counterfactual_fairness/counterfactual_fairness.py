"""Counterfactual fairness: do a model's scores change when only an identity term does?"""

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import counterfactual_fairness


class CounterfactualFairness(metric_base.SafetyMetric):
    measure = staticmethod(counterfactual_fairness)
    metric_description = (
        "Each row is one variant of a counterfactual set (the same sentence with the identity term of each group "
        "of one family, in one language). Reports flip_rate (Clopper-Pearson interval over sets), "
        "mean_abs_score_change (cluster bootstrap over sets), max_abs_score_change, and, comparing groups only "
        "within a (language, family) cell and within sets: each group's effect (score minus its set's mean, "
        "averaged over sets), group_gap and positive_rate_gap (largest minus smallest group effect, worst cell, "
        "no interval), group_gap_p_value (within-set permutation test of no group effect), "
        "average_group_fairness (worst cell's mean Wasserstein-1 distance to the pooled scores), and every "
        "cell's values as <language>/<family>/<metric>. Options: positive_label, n_permutations."
    )
    metric_citation = (
        "Huang et al. 2020, Reducing Sentiment Bias in Language Models via Counterfactual Evaluation. "
        "Kiritchenko and Mohammad 2018, Examining Gender and Race Bias in Two Hundred Sentiment Analysis Systems."
    )
    metric_features = {
        "set_ids": datasets.Value("int64"),
        "languages": datasets.Value("string"),
        "families": datasets.Value("string"),
        "groups": datasets.Value("string"),
        "scores": datasets.Value("float64"),
        "predictions": datasets.Value("int64"),
        "is_reference": datasets.Value("bool"),
    }
