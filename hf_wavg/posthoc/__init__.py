"""Post-hoc tools on saved checkpoints: streaming averages, model soups and WiSE-FT."""

from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
from hf_wavg.posthoc.evaluation import ModelEvaluator, greater_is_better
from hf_wavg.posthoc.merge import average_checkpoints
from hf_wavg.posthoc.model_weights import load_average_into
from hf_wavg.posthoc.soups import SoupResult, greedy_soup, uniform_soup
from hf_wavg.posthoc.wise_ft import WiseFT, WiseFTResult, wise_ft

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ModelEvaluator",
    "SoupResult",
    "WiseFT",
    "WiseFTResult",
    "average_checkpoints",
    "greater_is_better",
    "greedy_soup",
    "load_average_into",
    "uniform_soup",
    "wise_ft",
]
