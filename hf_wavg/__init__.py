"""hf_wavg: weight averaging (EMA, SWA, LAWA) for the Hugging Face Trainer, with safety evaluation."""

from hf_wavg.averager import WeightAverager
from hf_wavg.averaging import EMA, LAWA, SWA, AveragingStrategy, DecaySchedule
from hf_wavg.callback import WAvgCallback
from hf_wavg.config import WAvgConfig
from hf_wavg.params import select_tensors
from hf_wavg.safety import SafetyConfig, SafetySuite
from hf_wavg.state_io import AveragerStateError
from hf_wavg.trainer import WAvgTrainer

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "LAWA",
    "SWA",
    "AveragerStateError",
    "AveragingStrategy",
    "DecaySchedule",
    "WAvgCallback",
    "WAvgConfig",
    "WAvgTrainer",
    "SafetyConfig",
    "SafetySuite",
    "WeightAverager",
    "select_tensors",
    "__version__",
]
