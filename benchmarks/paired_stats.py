"""Paired differences over seeds and examples, for the quality benchmark.

Each method and the reference (the last weights) are measured on the same units (test
examples, review pairs, perturbed texts, counterfactual sets) in each of several seeds. A
method's effect is the mean over seeds of (method - reference), each seed's value a function
of unit weights (a rate, a mean, or a rate over a subset). Its interval adds the luck of
the test set (units resampled, the same resample for every seed, since every seed measures
the same test set) to training randomness (the spread over seeds beyond what example noise
explains). ``tests/test_paired_stats.py`` checks its coverage and false-alarm rate by
simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from hf_wavg.safety.stats import resample_weights

# A seed's difference under unit weights: (replicates, units) -> (replicates,).
SeedDifference = Callable[[np.ndarray], np.ndarray]

Z_80_POWER = stats.norm.ppf(0.8)


def unit_weights(rng: np.random.Generator, replicates: int, n_units: int) -> np.ndarray:
    """(replicates, units) multiplicities of a bootstrap resample of the units."""
    return resample_weights(rng.integers(0, n_units, size=(replicates, n_units)), n_units)


def paired_effect(
    per_seed: Sequence[SeedDifference],
    n_units: int,
    confidence_level: float = 0.95,
    replicates: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high"}``: the mean over seeds of each seed's difference on all
    units, with an interval that adds the two sources of error.

    A seed's difference is d_s = effect + a + u_s + e_s: ``a`` the luck of the shared test
    set, ``u_s`` the seed's own training noise, ``e_s`` its example noise. Resampling the units
    (the same resample for every seed) gives V_units = Var(a) + Var(e)/S for the seed mean,
    and within each seed Var(a) + Var(e), so Var(e) is known; the spread of d_s over seeds
    gives Var(u) + Var(e). The interval is mean ± sqrt(z^2 V_units + t^2 max(s^2 - Var(e), 0)/S)
    with t on S - 1 degrees of freedom, so few seeds widen it where seeds dominate."""
    ones = np.ones((1, n_units))
    per_seed_points = np.array([difference(ones)[0] for difference in per_seed], dtype=float)
    point = float(per_seed_points.mean())
    nan = float("nan")
    if n_units < 2 or not np.isfinite(point):
        return {"mean": point, "ci_low": nan, "ci_high": nan}
    weights = unit_weights(np.random.default_rng(seed), replicates, n_units)
    values = np.stack([difference(weights) for difference in per_seed])  # (seeds, replicates)
    n_seeds = len(per_seed)
    units_variance = float(np.nanvar(np.nanmean(values, axis=0), ddof=1))
    within = float(np.nanmean(np.nanvar(values, axis=1, ddof=1)))
    example_noise = max(within - units_variance, 0.0) * n_seeds / max(n_seeds - 1, 1)
    seed_excess = max(float(np.var(per_seed_points, ddof=1)) - example_noise, 0.0) if n_seeds > 1 else 0.0
    z = stats.norm.ppf(1 - (1 - confidence_level) / 2)
    t = stats.t.ppf(1 - (1 - confidence_level) / 2, max(n_seeds - 1, 1))
    half = float(np.sqrt(z**2 * units_variance + t**2 * seed_excess / n_seeds))
    return {"mean": point, "ci_low": point - half, "ci_high": point + half}


def mean_difference(first: np.ndarray, second: np.ndarray) -> SeedDifference:
    """Difference of two per-unit means under unit weights."""
    delta = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    return lambda weights: (weights @ delta) / weights.sum(axis=1)


def smallest_resolvable(half_widths: Sequence[float], confidence_level: float = 0.95) -> float:
    """The true difference a column detects with 80% power at its confidence level, from its
    intervals' typical half-width h (a normal approximation: h * (z_a + z_0.8) / z_a)."""
    finite = [h for h in half_widths if np.isfinite(h)]
    if not finite:
        return float("nan")
    z = stats.norm.ppf(1 - (1 - confidence_level) / 2)
    return float(np.median(finite) * (z + Z_80_POWER) / z)
