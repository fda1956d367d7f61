"""Paired differences over seeds and examples, for the quality benchmark.

Each method and the reference (the last weights) are measured on the same units (test
examples, review pairs, perturbed texts, counterfactual sets) in each of several seeds. A
method's effect is the mean over seeds of (method - reference), each seed's value a function
of unit weights (a rate, a mean, or a rate over a subset). Its interval adds the luck of
the test set (units resampled, the same resample for every seed, since every seed measures
the same test set) to training randomness (the spread over seeds beyond what example noise
explains). Each difference also gets the p-value at which its interval touches 0, and a
table's p-values their Benjamini-Hochberg q-values (:func:`q_values`), so only differences
that survive the table's many comparisons are called resolved. ``tests/test_paired_stats.py``
checks the coverage, the false-alarm rate and the false discovery rate by simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from scipy import optimize, stats

from hf_wavg.safety.stats import cluster_codes, few_cluster_factor, independent_units, product_weights

# A seed's difference under unit weights: (replicates, units) -> (replicates,).
SeedDifference = Callable[[np.ndarray], np.ndarray]

Z_80_POWER = stats.norm.ppf(0.8)
SMALLEST_P = 1e-12  # p-values below this are reported as this
Key = TypeVar("Key", bound=Hashable)


def unit_weights(rng: np.random.Generator, replicates: int, n_units: int,
                 clusters: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """(replicates, units) weights of a bootstrap resample of the units, or, for clustered
    units (counterfactual sets sharing terms and templates), of both kinds of cluster at once."""
    codes = cluster_codes(clusters, n_units)
    return product_weights([rng.integers(0, int(c.max()) + 1, size=(replicates, int(c.max()) + 1)) for c in codes],
                           codes)


def paired_effect(
    per_seed: Sequence[SeedDifference],
    n_units: int,
    confidence_level: float = 0.95,
    replicates: int = 2000,
    seed: int = 0,
    clusters: tuple[np.ndarray, ...] | None = None,
) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high", "p_value"}``: the mean over seeds of each seed's
    difference on all units, with an interval that adds the two sources of error, and the
    p-value of "no difference": the level 1 - p at which that interval touches 0.

    A seed's difference is d_s = effect + a + u_s + e_s: ``a`` the luck of the shared test
    set, ``u_s`` the seed's own training noise, ``e_s`` its example noise. Resampling the units
    (the same resample for every seed) gives V_units = Var(a) + Var(e)/S for the seed mean,
    and within each seed Var(a) + Var(e), so Var(e) and Var(a) are known; the spread s^2 of
    d_s over seeds estimates Var(u) + Var(e) on S - 1 degrees of freedom. The interval is
    mean ± sqrt(z^2 Var(a) + max(t^2 s^2, z^2 Var(e)) / S): a t test over seeds plus the shared
    test set's luck, never narrower than the example noise alone allows. The seeds' part keeps
    its t whole, so a spread that is small by chance does not make the p-value tiny
    (subtracting Var(e) from s^2 and taking the rest with z, as this did before, gave p < 0.001
    seven times too often when seed noise dominated); and seeds that differ alike by chance (a
    spread of 0 on discrete outcomes) still get the example noise's width. Units are resampled
    by ``clusters`` (two-way) where given, and the parts estimated from that resampling are
    widened for few clusters as the safety suite's intervals are (``few_cluster_factor``)."""
    ones = np.ones((1, n_units))
    per_seed_points = np.array([difference(ones)[0] for difference in per_seed], dtype=float)
    point = float(per_seed_points.mean())
    nan = float("nan")
    if n_units < 2 or not np.isfinite(point):
        return {"mean": point, "ci_low": nan, "ci_high": nan, "p_value": nan}
    weights = unit_weights(np.random.default_rng(seed), replicates, n_units, clusters)
    values = np.stack([difference(weights) for difference in per_seed])  # (seeds, replicates)
    n_seeds = len(per_seed)
    units_variance = float(np.nanvar(np.nanmean(values, axis=0), ddof=1))
    within = float(np.nanmean(np.nanvar(values, axis=1, ddof=1)))
    if n_seeds > 1:
        example_noise = max(within - units_variance, 0.0) * n_seeds / (n_seeds - 1)
        test_set = max(units_variance - example_noise / n_seeds, 0.0)
        spread = float(np.var(per_seed_points, ddof=1))
    else:  # one seed: its example noise is all the bootstrap can tell
        test_set, spread, example_noise = units_variance, 0.0, 0.0
    degrees = max(n_seeds - 1, 1)
    n_clusters = independent_units(cluster_codes(clusters, n_units)) if clusters is not None else None

    def half_width(alpha: float) -> float:
        z, t = stats.norm.ppf(1 - alpha / 2), stats.t.ppf(1 - alpha / 2, degrees)
        if n_clusters is not None:
            z *= few_cluster_factor(n_clusters, 1 - alpha)
        return float(np.sqrt(z**2 * test_set + max(t**2 * spread, z**2 * example_noise) / n_seeds))

    half = half_width(1 - confidence_level)
    return {"mean": point, "ci_low": point - half, "ci_high": point + half,
            "p_value": touching_level(half_width, abs(point))}


def touching_level(half_width: Callable[[float], float], distance: float) -> float:
    """The alpha at which an interval of ``half_width(alpha)`` (shrinking as alpha grows) around
    a point ``distance`` from 0 just reaches 0: the p-value the interval implies."""
    if distance == 0:
        return 1.0
    if half_width(SMALLEST_P) <= distance:  # also every interval of width 0
        return SMALLEST_P
    if half_width(1 - 1e-9) >= distance:
        return 1.0
    return float(optimize.brentq(lambda alpha: half_width(alpha) - distance, SMALLEST_P, 1 - 1e-9, xtol=1e-12))


def q_values(p_values: Mapping[Key, float]) -> dict[Key, float]:
    """Benjamini-Hochberg q-values over every finite p-value given (NaN stays NaN): calling
    resolved the cells with q < alpha keeps the expected share of false ones among them at
    most alpha, however many cells a table has."""
    keys = [k for k, p in p_values.items() if np.isfinite(p)]
    adjusted = stats.false_discovery_control([p_values[k] for k in keys], method="bh") if keys else []
    out = dict.fromkeys(p_values, float("nan"))
    out.update({k: float(q) for k, q in zip(keys, adjusted)})
    return out


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
