"""Intervals and tests for metrics over independent units (examples, or counterfactual
sets): bootstrap intervals (``scipy.stats.bootstrap``) for means, Clopper-Pearson intervals
for rates, and a within-set permutation test for group effects.

Statistics are written against a *weight matrix* ``W`` of shape (resamples, units): row b
counts how often each unit appears in resample b (all ones for the point estimate). Means,
rates and distribution distances then become matrix products over a whole batch of
resamples, which makes a thousand resamples cheap enough to run at every evaluation.
"""

from __future__ import annotations

import math
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


def binomial_interval(successes: int, trials: int, confidence_level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a rate: it never collapses to a point, so zero
    flips in 24 sets reads [0, 0.14], not [0, 0]. NaN for no trials."""
    if trials == 0:
        return math.nan, math.nan
    k, n, alpha = int(successes), int(trials), 1.0 - confidence_level
    # The beta-quantile form of the exact interval (what scipy's binomtest computes, faster).
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def wilson_interval(successes: int, trials: int, confidence_level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate (the building block of Newcombe's paired interval)."""
    if trials == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence_level / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_with_interval(name: str, outcomes: np.ndarray, confidence_level: float = 0.95, **_: object) -> dict[str, float]:
    """``{name, name_ci_low, name_ci_high}`` for 0/1 outcomes of independent units."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    low, high = binomial_interval(int(outcomes.sum()), len(outcomes), confidence_level)
    point = float(outcomes.mean()) if len(outcomes) else math.nan
    return {name: point, f"{name}_ci_low": low, f"{name}_ci_high": high}


def within_set_permutations(set_codes: np.ndarray, n_permutations: int, seed: int = 0) -> np.ndarray:
    """(permutations, rows) row indices that shuffle rows within their set: row ``i`` takes
    the value of row ``out[b, i]``, always a row of the same set. Under "no group effect"
    a set's variants are exchangeable, so these shuffles draw from the null distribution."""
    rng = np.random.default_rng(seed)
    canonical = np.argsort(set_codes, kind="stable")
    keys = set_codes[None, :] + rng.random((n_permutations, len(set_codes)))  # random order inside each set
    order = np.argsort(keys, axis=1, kind="stable")
    out = np.empty_like(order)
    out[:, canonical] = order
    return out


def permutation_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """(1 + #{null >= observed}) / (1 + permutations), per column of ``null`` (permutations,
    statistics): exact under exchangeability, never zero. A relative tolerance keeps
    floating-point ties from counting as smaller."""
    tolerance = 1e-9 * np.maximum(1.0, np.abs(observed))
    exceed = (null >= observed - tolerance).sum(axis=0)
    return (1.0 + exceed) / (1.0 + null.shape[0])
