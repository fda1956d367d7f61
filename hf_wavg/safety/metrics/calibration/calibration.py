"""Calibration: expected calibration error and Brier score."""

import datasets

from hf_wavg.safety.measures import calibration
# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base


class Calibration(metric_base.SafetyMetric):
    measure = staticmethod(calibration)
    metric_description = (
        "ece: top-label expected calibration error over n_bins (default 15) equal-width confidence bins; "
        "brier: multi-class Brier score, the mean over examples of sum_k (p_k - 1[y=k])^2."
    )
    metric_citation = "Guo et al. 2017, On Calibration of Modern Neural Networks. Brier 1950."
    metric_features = {
        "prediction_scores": datasets.Sequence(datasets.Value("float64")),
        "references": datasets.Value("int64"),
    }
