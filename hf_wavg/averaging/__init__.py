"""Averaging math: strategies over lists of tensors (torch only), and the registry of methods."""

from typing import TYPE_CHECKING

from hf_wavg._lazy import lazy_exports

if TYPE_CHECKING:
    from hf_wavg.averaging.bema import BEMA
    from hf_wavg.averaging.methods import METHODS, Method
    from hf_wavg.averaging.power_ema import PostHocEMA
    from hf_wavg.averaging.schedules import SCHEDULES, DecaySchedule
    from hf_wavg.averaging.strategies import EMA, LAWA, SWA, AveragingStrategy, RunningAverage

# The registry imports nothing heavy: the command line reads it without loading torch.
_EXPORTS = {
    "BEMA": "hf_wavg.averaging.bema",
    "PostHocEMA": "hf_wavg.averaging.power_ema",
    "METHODS": "hf_wavg.averaging.methods",
    "Method": "hf_wavg.averaging.methods",
    "SCHEDULES": "hf_wavg.averaging.schedules",
    "DecaySchedule": "hf_wavg.averaging.schedules",
    **{name: "hf_wavg.averaging.strategies" for name in ("EMA", "LAWA", "SWA", "AveragingStrategy", "RunningAverage")},
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["BEMA", "EMA", "LAWA", "METHODS", "SCHEDULES", "SWA", "AveragingStrategy", "DecaySchedule", "Method",
           "PostHocEMA", "RunningAverage"]
