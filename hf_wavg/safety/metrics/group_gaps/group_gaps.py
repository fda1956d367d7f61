"""Group gaps on labelled data: accuracy, positive-rate and equalized-odds gaps."""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import group_gaps


class GroupGaps(metric_base.SafetyMetric):
    measure = staticmethod(group_gaps)
    metric_description = (
        "Largest difference between groups in accuracy (accuracy_gap), positive-prediction rate "
        "(positive_rate_gap, demographic parity) and true/false-positive rates (equalized_odds_gap), without "
        "interval; each group's rates with Clopper-Pearson intervals as <group>/<rate>. Option: positive_label "
        "(default 1)."
    )
    metric_citation = "Hardt, Price and Srebro 2016, Equality of Opportunity in Supervised Learning."
    metric_features: ClassVar[dict[str, Any]] = {
        "predictions": datasets.Value("int64"),
        "references": datasets.Value("int64"),
        "groups": datasets.Value("string"),
    }
