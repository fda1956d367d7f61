"""Paired comparisons of two sets of weights measured on the very same units: the same
counterfactual sets, perturbed texts, attacked texts and calibration examples. The suite
keeps each run's per-unit outcomes in a :class:`UnitTable`; :func:`paired_deltas` reports
``delta/<part>/<metric>`` = first minus second (average minus raw) with a bootstrap interval
that resamples units jointly for both runs, so what the two share cancels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hf_wavg.safety.stats import binomial_interval, independent_units, wilson_interval, with_intervals


@dataclass
class UnitTable:
    """Per-unit outcomes of one part of one suite run.

    ``ratios`` maps a metric to (numerators, denominators): the metric under unit weights
    ``w`` is ``w @ numerators / w @ denominators`` (a rate, a mean, or a rate over a subset
    such as the attack's originally-correct texts). ``binary`` names the metrics whose
    numerators are 0/1 outcomes of independent units. ``clusters``, for units that are not
    independent (counterfactual sets sharing terms and templates), gives each unit's two
    crossed clusters: every metric then gets the two-way cluster bootstrap."""

    ids: list
    ratios: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    binary: frozenset[str] = frozenset()
    clusters: tuple[np.ndarray, np.ndarray] | None = None

    def ratio(self, weights: np.ndarray, metric: str) -> np.ndarray:
        numerators, denominators = self.ratios[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ numerators) / (weights @ denominators)


def paired_deltas(first: dict[str, UnitTable], second: dict[str, UnitTable], **bootstrap) -> dict[str, float]:
    """``delta/<part>/<metric>`` (first minus second) with ``_ci_low``/``_ci_high`` for every
    part both runs measured on identical units. A binary metric over the same independent
    units in both runs gets Newcombe's interval for paired proportions
    (:func:`paired_rate_interval`); every other ratio, and every metric of clustered units, a
    bootstrap over units (or both kinds of cluster) resampled jointly for both runs."""
    out: dict[str, float] = {}
    confidence = bootstrap.get("confidence_level", 0.95)
    for part in first.keys() & second.keys():
        a, b = first[part], second[part]
        if a.ids != b.ids:
            continue  # not the same units: no paired comparison
        metrics = [m for m in a.ratios if m in b.ratios]
        # Binary outcomes over the same units get Newcombe's interval; the rest a bootstrap.
        rates = [m for m in metrics if m in a.binary and np.array_equal(a.ratios[m][1], b.ratios[m][1])
                 and a.clusters is None]
        means = [m for m in metrics if m not in rates]

        def statistic(w: np.ndarray, a: UnitTable = a, b: UnitTable = b, means: list[str] = means) -> list[np.ndarray]:
            return [a.ratio(w, m) - b.ratio(w, m) for m in means]

        values = with_intervals(statistic, len(a.ids), [f"delta/{part}/{m}" for m in means], clusters=a.clusters,
                                **bootstrap) if means else {}
        if a.clusters is not None:
            values.update(_no_discordant_bound(a, b, part, means, confidence))
        for metric in rates:
            (first_hits, units), (second_hits, _) = a.ratios[metric], b.ratios[metric]
            counted = units > 0
            low, high = paired_rate_interval(first_hits[counted], second_hits[counted], confidence)
            name = f"delta/{part}/{metric}"
            values[name] = float(first_hits[counted].mean() - second_hits[counted].mean()) if counted.any() else float("nan")
            values[f"{name}_ci_low"], values[f"{name}_ci_high"] = low, high
        out.update(values)
    return out


def _no_discordant_bound(a: UnitTable, b: UnitTable, part: str, metrics: list[str],
                         confidence_level: float) -> dict[str, float]:
    """For a binary metric of clustered units on which the two runs never disagree, every
    resample gives 0 and the bootstrap a point: the interval is then +-Clopper-Pearson's bound
    on the rate of disagreement over the fewer of the two kinds of cluster, the independent
    units there surely are (as :func:`paired_rate_interval` does for independent units)."""
    assert a.clusters is not None
    units = independent_units(a.clusters)
    out = {}
    for metric in metrics:
        if metric in a.binary and np.array_equal(a.ratios[metric][0], b.ratios[metric][0]):
            _, bound = binomial_interval(0, units, confidence_level)
            out[f"delta/{part}/{metric}_ci_low"], out[f"delta/{part}/{metric}_ci_high"] = -bound, bound
    return out


def paired_rate_interval(first: np.ndarray, second: np.ndarray, confidence_level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(first) - mean(second) for paired 0/1 outcomes of n units: Newcombe's
    hybrid score interval for a difference of paired proportions (Newcombe 1998, method
    10), which combines the two rates' Wilson intervals with their correlation. Unlike an
    interval conditioned on the discordant units alone, it keeps its coverage when only
    one of the two ever wins (averaging fixing errors and causing none)."""
    n = len(first)
    both = int(((first == 1) & (second == 1)).sum())
    only_first = int(((first == 1) & (second == 0)).sum())
    only_second = int(((first == 0) & (second == 1)).sum())
    neither = n - both - only_first - only_second
    if only_first == only_second == 0:
        # No discordant unit: the rate of discordance is below its Clopper-Pearson bound, and
        # so is the difference (the score interval would shrink to a point near a rate of 1/2).
        _, bound = binomial_interval(0, n, confidence_level)
        return -bound, bound
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n, confidence_level)
    l2, u2 = wilson_interval(both + only_second, n, confidence_level)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    # Newcombe's corrected correlation: max(AD - BC - n/2, 0) keeps the interval from
    # collapsing when the two rates are almost perfectly correlated.
    phi = max(both * neither - only_first * only_second - n / 2, 0.0) / np.sqrt(margins) if margins > 0 else 0.0
    below = np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = np.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return p1 - p2 - below, p1 - p2 + above


def mean_table(ids: Sequence, values: dict[str, np.ndarray], binary: Sequence[str] = (),
               subsets: dict[str, np.ndarray] | None = None) -> UnitTable:
    """A :class:`UnitTable` of plain means (denominator 1), or means over a subset of units
    (``subsets[metric]``, a 0/1 mask) where given."""
    subsets = subsets or {}
    ratios = {}
    for metric, numerators in values.items():
        mask = np.asarray(subsets.get(metric, np.ones(len(ids))), dtype=np.float64)
        ratios[metric] = (np.asarray(numerators, dtype=np.float64) * mask, mask)
    return UnitTable(list(ids), ratios, frozenset(binary))

