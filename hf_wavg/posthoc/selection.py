"""Choosing the best setting of a sweep (a WiSE-FT alpha, a post-hoc EMA width) on a metric."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hf_wavg.safety import catalog  # catalog.greater_is_better: the parameters of that name shadow it


def best_setting(
    settings: Sequence[float],
    metrics: Sequence[dict[str, float]],
    metric: str,
    greater_is_better: bool | None = None,
    ties_to_larger: bool = False,
    name: str = "setting",
) -> float:
    """The setting whose ``metric`` is best (its declared direction unless
    ``greater_is_better`` says); on a tie the larger setting with ``ties_to_larger``, else
    the one given first. Settings without a finite value are passed over."""
    sign = 1.0 if (catalog.greater_is_better(metric) if greater_is_better is None else greater_is_better) else -1.0
    scored = [(sign * m[metric], setting if ties_to_larger else -index, setting)
              for index, (setting, m) in enumerate(zip(settings, metrics)) if math.isfinite(m.get(metric, math.nan))]
    if not scored:
        raise KeyError(f"no {name} has a finite {metric!r}")
    return max(scored, key=lambda entry: entry[:2])[2]
