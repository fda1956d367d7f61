"""What the safety metrics mean to a reader: which direction is better for each, and which
are the headline metrics that the console, the plot and the model card show (every metric
is in the log and the report). One declaration per metric; nothing is inferred from names.
"""

from __future__ import annotations

# Metrics by their last key component (``counterfactual/hi/names/flip_rate`` -> ``flip_rate``):
# True when higher is better, False when lower is, None when neither side is better (a rate
# whose ideal is a balance, or a descriptive count).
DIRECTIONS: dict[str, bool | None] = {
    # counterfactual fairness
    "flip_rate": False,
    "mean_abs_score_change": False,
    "max_abs_score_change": False,
    "group_gap": False,
    "group_gap_debiased": False,
    "group_gap_holm": False,
    # p-values of "no group effect" (terms as units) and "no term matters": higher is less evidence of bias
    "group_test_p_value": True,
    "group_test_p_holm": True,
    "term_sensitivity_p_value": True,
    "average_group_fairness": False,
    # group gaps on labelled data
    "accuracy_gap": False,
    "positive_rate_gap": False,
    "equalized_odds_gap": False,
    "positive_rate": None,
    # likelihood (pseudo-log-likelihood) gaps of masked language models
    "likelihood_gap": False,
    "mean_gap": False,
    "mean_abs_gap": False,
    "preference_rate": None,  # ideal 0.5: neither group's sentence preferred
    "tie_rate": None,
    # robustness
    "accuracy": True,
    "invariance_failure_rate": False,
    "attack_success_rate": False,
    "accuracy_under_attack": True,
    # calibration
    "brier": False,
    "ece": False,
    "ece_squared_debiased": False,
    # per-group and signed values: compared through the gaps above, not better or worse alone
    "effect": None,
    "tpr": None,
    "fpr": None,
    # bookkeeping: sizes, counts and costs of the measurement
    "applicable": None,
    "ece_bins": None,
    "examples": None,
    "mean_edited_words": None,
    "mean_queries": None,
    "model_queries": None,
    "num_applicable": None,
    "num_cells_holm": None,
    "num_cells_testable": None,
    "num_cells_untestable": None,
    "num_terms": None,
    "num_attacked": None,
    "num_examples": None,
    "num_flips": None,
    "num_groups": None,
    "num_sets": None,
    "num_skipped": None,
    "num_successes": None,
    "seconds": None,
    "texts_with_identity_terms": None,
    "truncated_texts": None,
}
# Task metrics named by evaluate or compute_metrics that are errors rather than scores.
_LOWER_IS_BETTER_TASK_METRICS = ("loss", "error", "wer", "cer", "perplexity")

HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("counterfactual/flip_rate", "Counterfactual flip rate"),
    ("counterfactual/mean_abs_score_change", "Score change under identity swap"),
    ("counterfactual/group_test_p_value", "Group effect p (terms as units, Holm)"),
    ("counterfactual/group_gap_holm", "Group gap of cells passing Holm"),
    ("perturbation/accuracy", "Accuracy under perturbation"),
    ("perturbation/invariance_failure_rate", "Perturbation invariance failures"),
    ("adversarial/attack_success_rate", "Attack success rate"),
    ("adversarial/accuracy_under_attack", "Accuracy under attack"),
    ("calibration/brier", "Brier score (summed over classes)"),
    ("calibration/ece", "ECE (equal-mass bins)"),
)


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of ``metric`` is better: a safety metric by its declaration
    (``safety/calibration/ece``: no), a task metric unless it is a loss or an error rate.
    Raises ``ValueError`` for a metric with no better side (nothing to optimise)."""
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in DIRECTIONS:
        direction = DIRECTIONS[leaf]
        if direction is None:
            raise ValueError(f"{metric!r} has no better direction (it is descriptive, or its ideal is a balance): "
                             "choose another metric, or say which way is better (greater_is_better)")
        return direction
    return not any(marker in leaf.lower() for marker in _LOWER_IS_BETTER_TASK_METRICS)
