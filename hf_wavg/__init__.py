"""hf_wavg: weight averaging (EMA, SWA, LAWA, BEMA, post-hoc EMA) for the Hugging Face Trainer, with safety
evaluation."""

from typing import TYPE_CHECKING

from hf_wavg._lazy import lazy_exports

if TYPE_CHECKING:
    from hf_wavg.averager import WeightAverager
    from hf_wavg.averaging import BEMA, EMA, LAWA, SWA, AveragingStrategy, DecaySchedule, PostHocEMA
    from hf_wavg.callback import WAvgCallback
    from hf_wavg.callback_group import WAvgCallbacks
    from hf_wavg.config import WAvgConfig
    from hf_wavg.params import select_tensors
    from hf_wavg.safety import SafetyConfig, SafetySuite
    from hf_wavg.state_io import AveragerStateError
    from hf_wavg.trainer import WAvgTrainer

# Names resolve on first use: `import hf_wavg` (and `hf-wavg --help`) stays fast, and
# transformers, peft and evaluate load only when something needs them.
_EXPORTS = {
    "WeightAverager": "hf_wavg.averager",
    "BEMA": "hf_wavg.averaging",
    "EMA": "hf_wavg.averaging",
    "LAWA": "hf_wavg.averaging",
    "SWA": "hf_wavg.averaging",
    "PostHocEMA": "hf_wavg.averaging",
    "AveragingStrategy": "hf_wavg.averaging",
    "DecaySchedule": "hf_wavg.averaging",
    "WAvgCallback": "hf_wavg.callback",
    "WAvgCallbacks": "hf_wavg.callback_group",
    "WAvgConfig": "hf_wavg.config",
    "select_tensors": "hf_wavg.params",
    "SafetyConfig": "hf_wavg.safety",
    "SafetySuite": "hf_wavg.safety",
    "AveragerStateError": "hf_wavg.state_io",
    "WAvgTrainer": "hf_wavg.trainer",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "BEMA",
    "EMA",
    "LAWA",
    "SWA",
    "AveragerStateError",
    "AveragingStrategy",
    "DecaySchedule",
    "PostHocEMA",
    "SafetyConfig",
    "SafetySuite",
    "WAvgCallback",
    "WAvgCallbacks",
    "WAvgConfig",
    "WAvgTrainer",
    "WeightAverager",
    "__version__",
    "select_tensors",
]
