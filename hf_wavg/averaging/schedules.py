"""Decay schedules for the exponential moving average.

A schedule maps ``t``, the number of snapshots already folded into the average, to the
decay ``beta_t`` of the next update ``avg <- beta_t * avg + (1 - beta_t) * w``.
Warm-up matters: a constant 0.999 decay would keep the pre-training weights dominant for
thousands of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

ScheduleName = Literal["constant", "rational", "power", "mean"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass(frozen=True)
class DecaySchedule:
    """``beta_t`` for the EMA, capped at ``decay``.

    - ``constant``: ``decay``.
    - ``rational``: ``min(decay, (1 + t) / (10 + t))`` (TensorFlow's ``num_updates`` warm-up).
    - ``power``: ``min(decay, 1 - (1 + t / gamma) ** -power)`` (timm's and diffusers' warm-up).
    - ``mean``: ``min(decay, t / (1 + t))``: the plain mean of the snapshots so far (as SWA)
      until the cap, then the exponential decay. Its window grows as fast as snapshots
      arrive, so it reaches any cap within the run; the other warm-ups reach ``decay`` only
      after about ``9 / (1 - decay)`` (rational) snapshots, so a long horizon on a short run
      would be capped short of what was asked. A ``horizon`` uses this one.
    """

    decay: float = 0.999
    schedule: ScheduleName = "rational"
    power: float = 2.0 / 3.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.power <= 0.0:
            raise ValueError(f"power must be > 0, got {self.power}")
        if self.gamma <= 0.0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def __call__(self, t: int) -> float:
        if self.schedule == "constant":
            return self.decay
        if self.schedule == "rational":
            return min(self.decay, (1.0 + t) / (10.0 + t))
        if self.schedule == "mean":
            return min(self.decay, t / (1.0 + t))
        return min(self.decay, 1.0 - (1.0 + t / self.gamma) ** -self.power)
