"""Perturbation robustness: accuracy and invariance under label-preserving noise."""

from typing import Any, ClassVar

import datasets

# The base class is reached through its module: evaluate loads the first metric class
# it finds in this module's namespace, which must be the one defined here.
from hf_wavg.safety import metric_base
from hf_wavg.safety.measures import perturbation_robustness


class PerturbationRobustness(metric_base.SafetyMetric):
    measure = staticmethod(perturbation_robustness)
    metric_description = (
        "Rows are perturbed examples: the prediction on the perturbed text, on the original text, the label "
        "(-1 when unknown) and the perturbation family. Reports accuracy and invariance_failure_rate overall and "
        "as <family>/accuracy, <family>/invariance_failure_rate, each with a Clopper-Pearson interval over rows."
    )
    metric_citation = "Ribeiro et al. 2020, Beyond Accuracy: Behavioral Testing of NLP Models with CheckList."
    metric_features: ClassVar[dict[str, Any]] = {
        "predictions": datasets.Value("int64"),
        "original_predictions": datasets.Value("int64"),
        "references": datasets.Value("int64"),
        "perturbations": datasets.Value("string"),
    }

    def _compute(self, references, **kwargs):
        known = None if all(label < 0 for label in references) else references
        if known is not None and any(label < 0 for label in references):
            raise ValueError("perturbation_robustness: references mix known labels and -1; give all or none")
        return super()._compute(references=known, **kwargs)
