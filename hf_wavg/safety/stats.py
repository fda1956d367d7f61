"""Bootstrap confidence intervals (``scipy.stats.bootstrap``) for metrics over resampled
units: examples, or counterfactual sets.

Statistics are written against a *weight matrix* ``W`` of shape (resamples, units): row b
counts how often each unit appears in resample b (all ones for the point estimate). Means,
rates and distribution distances then become matrix products over a whole batch of
resamples, which makes a thousand resamples cheap enough to run at every evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

WeightedStatistic = Callable[[np.ndarray], Sequence[np.ndarray]]


def resample_weights(indices: np.ndarray, n_units: int) -> np.ndarray:
    """(resamples, units) multiplicities from scipy's resampled index arrays."""
    indices = np.atleast_2d(indices)
    rows = np.arange(indices.shape[0])[:, None] * n_units
    counts = np.bincount((rows + indices).ravel(), minlength=indices.shape[0] * n_units)
    return counts.reshape(indices.shape[0], n_units).astype(np.float64)


def weighted_mean(weights: np.ndarray, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``values`` under each weight row (restricted to ``rows``); NaN where empty."""
    w = weights if rows is None else weights * rows
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w @ values) / total, np.nan)


def group_rate_gap(weights: np.ndarray, onehot: np.ndarray, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Highest minus lowest group mean of ``values`` (groups given as a one-hot (units,
    groups) matrix); NaN where fewer than two groups are present."""
    member = onehot if rows is None else onehot * rows[:, None]
    counts = weights @ member
    sums = weights @ (member * values[:, None])
    present = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = sums / counts
    gap = np.where(present, rates, -np.inf).max(axis=1) - np.where(present, rates, np.inf).min(axis=1)
    return np.where(present.sum(axis=1) >= 2, gap, np.nan)


def with_intervals(
    statistic: WeightedStatistic,
    n_units: int,
    names: Sequence[str],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 1000,
    method: str = "BCa",
    seed: int = 0,
) -> dict[str, float]:
    """``{name: point, name_ci_low: ..., name_ci_high: ...}``.

    BCa corrects the bias of statistics such as maxima or distances, which plain percentile
    intervals can leave beside the point estimate. Where BCa is undefined (e.g. all
    resamples equal) the percentile interval is used; an interval neither defines (fewer
    than two units, or a statistic undefined on some resamples) is NaN rather than a
    made-up width.
    """

    def on_indices(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        values = np.stack([np.asarray(v, dtype=np.float64) for v in statistic(resample_weights(indices, n_units))])
        return values[:, 0] if indices.ndim == 1 else values

    point = on_indices(np.arange(n_units))
    low, high = np.full_like(point, np.nan), np.full_like(point, np.nan)
    pending = np.isfinite(point)
    if n_units >= 2 and n_resamples > 0:
        for attempt in dict.fromkeys((method, "percentile")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = stats.bootstrap(
                    (np.arange(n_units),), on_indices, vectorized=True, batch=max(1, 2_000_000 // max(n_units, 1)),
                    n_resamples=n_resamples, confidence_level=confidence_level, method=attempt,
                    rng=np.random.default_rng(seed),
                )
            interval_low = np.asarray(result.confidence_interval.low, dtype=np.float64)
            interval_high = np.asarray(result.confidence_interval.high, dtype=np.float64)
            ok = pending & np.isfinite(interval_low) & np.isfinite(interval_high)
            low[ok], high[ok] = interval_low[ok], interval_high[ok]
            pending &= ~ok
            if not pending.any():
                break
    out: dict[str, float] = {}
    for name, p, lo, hi in zip(names, point, low, high):
        out[name] = float(p)
        out[f"{name}_ci_low"] = float(lo)
        out[f"{name}_ci_high"] = float(hi)
    return out
