"""Calibration: expected calibration error and Brier score."""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import calibration


class Calibration(metric_base.SafetyMetric):
    measure = staticmethod(calibration)
    metric_description = (
        "brier (headline): multi-class Brier score, the mean over examples of sum_k (p_k - 1[y=k])^2, summed over "
        "classes; ece: top-label expected calibration error over at most n_bins (default 15, at most sqrt(N)) "
        "equal-mass bins, a plug-in estimate without interval; ece_squared_debiased: the debiased squared ECE "
        "(Kumar et al. 2019) with a bootstrap interval, centred on 0 for a calibrated model."
    )
    metric_citation = (
        "Brier 1950. Guo et al. 2017, On Calibration of Modern Neural Networks. Nixon et al. 2019, Measuring "
        "Calibration in Deep Learning. Kumar, Liang and Ma 2019, Verified Uncertainty Calibration."
    )
    metric_features: ClassVar[dict[str, Any]] = {
        "prediction_scores": datasets.Sequence(datasets.Value("float64")),
        "references": datasets.Value("int64"),
    }
