"""Averaging math: strategies over lists of tensors (torch only)."""

from hf_wavg.averaging.schedules import SCHEDULES, DecaySchedule
from hf_wavg.averaging.strategies import EMA, LAWA, SWA, AveragingStrategy, RunningAverage

__all__ = ["EMA", "LAWA", "SWA", "SCHEDULES", "AveragingStrategy", "DecaySchedule", "RunningAverage"]
