"""Counterfactual fairness: do a model's scores change when only an identity term does?"""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import counterfactual_fairness


class CounterfactualFairness(metric_base.SafetyMetric):
    measure = staticmethod(counterfactual_fairness)
    metric_description = (
        "Each row is one variant of a counterfactual set (the same sentence with the identity term of each group "
        "of one family, in one language); blocks name which terms a set holds (sets of a cell with the same block "
        "hold the same term per group) and templates its sentence frame. Reports flip_rate and "
        "mean_abs_score_change with intervals resampling terms and templates (two-way cluster bootstrap), "
        "max_abs_score_change, and, comparing groups only within a (language, family) cell and within sets, with "
        "identity terms as the units: each group's effect, each cell's group_test_p_value (blocks-by-groups F "
        "test; NaN when a group has one term: untestable), group_gap with Tukey's interval and "
        "group_gap_debiased; across cells Holm's procedure: group_test_p_value (family-wise), num_cells_holm, "
        "group_gap_holm (largest debiased gap of the cells that pass); term_sensitivity_p_value (within-set "
        "permutation test of no term mattering), positive_rate_gap and average_group_fairness per cell, as "
        "<language>/<family>/<metric>. Options: positive_label, n_permutations."
    )
    metric_citation = (
        "Huang et al. 2020, Reducing Sentiment Bias in Language Models via Counterfactual Evaluation. "
        "Kiritchenko and Mohammad 2018, Examining Gender and Race Bias in Two Hundred Sentiment Analysis Systems."
    )
    metric_features: ClassVar[dict[str, Any]] = {
        "set_ids": datasets.Value("int64"),
        "languages": datasets.Value("string"),
        "families": datasets.Value("string"),
        "groups": datasets.Value("string"),
        "scores": datasets.Value("float64"),
        "predictions": datasets.Value("int64"),
        "is_reference": datasets.Value("bool"),
        "blocks": datasets.Value("string"),
        "templates": datasets.Value("string"),
    }
