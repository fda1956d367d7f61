"""Paired comparisons of two sets of weights measured on the very same units: the same
counterfactual sets, perturbed texts, attacked texts and calibration examples. The suite
keeps each run's per-unit outcomes in a :class:`UnitTable`; :func:`paired_deltas` reports
``delta/<part>/<metric>`` = first minus second (average minus raw) with a bootstrap interval
that resamples units jointly for both runs, so what the two share cancels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hf_wavg.safety.measures import SetLayout, worst_cell_gap
from hf_wavg.safety.stats import binomial_interval, with_intervals


@dataclass
class UnitTable:
    """Per-unit outcomes of one part of one suite run.

    ``ratios`` maps a metric to (numerators, denominators): the metric under unit weights
    ``w`` is ``w @ numerators / w @ denominators`` (a rate, a mean, or a rate over a subset
    such as the attack's originally-correct texts). ``binary`` names the metrics whose
    numerators are 0/1 outcomes of independent units. With ``layout`` and ``deviations`` the
    units are counterfactual sets and ``group_gap`` (worst cell) is compared too."""

    ids: list
    ratios: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    binary: frozenset[str] = frozenset()
    layout: SetLayout | None = None
    deviations: np.ndarray | None = None

    def ratio(self, weights: np.ndarray, metric: str) -> np.ndarray:
        numerators, denominators = self.ratios[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ numerators) / (weights @ denominators)

    def group_gap(self, weights: np.ndarray) -> np.ndarray:
        assert self.layout is not None and self.deviations is not None
        return worst_cell_gap(self.layout, weights, self.deviations)


def paired_deltas(first: dict[str, UnitTable], second: dict[str, UnitTable], **bootstrap) -> dict[str, float]:
    """``delta/<part>/<metric>`` (first minus second) with ``_ci_low``/``_ci_high`` for every
    part both runs measured on identical units. A binary metric over the same units in both
    runs gets the exact conditional interval of paired proportions (:func:`discordant_interval`);
    every other metric, and the group gap, a bootstrap over units resampled jointly."""
    out: dict[str, float] = {}
    confidence = bootstrap.get("confidence_level", 0.95)
    for part in first.keys() & second.keys():
        a, b = first[part], second[part]
        if a.ids != b.ids:
            continue  # not the same units: no paired comparison
        metrics = [m for m in a.ratios if m in b.ratios]
        with_gap = a.layout is not None and b.layout is not None

        def statistic(w: np.ndarray, a: UnitTable = a, b: UnitTable = b, metrics: list[str] = metrics,
                      with_gap: bool = with_gap) -> list[np.ndarray]:
            values = [a.ratio(w, m) - b.ratio(w, m) for m in metrics]
            return values + ([a.group_gap(w) - b.group_gap(w)] if with_gap else [])

        names = [f"delta/{part}/{m}" for m in metrics] + ([f"delta/{part}/group_gap"] if with_gap else [])
        values = with_intervals(statistic, len(a.ids), names, **bootstrap)
        for metric in metrics:
            (first_hits, units), (second_hits, second_units) = a.ratios[metric], b.ratios[metric]
            if metric in a.binary and np.array_equal(units, second_units):
                counted = units > 0
                low, high = discordant_interval(first_hits[counted], second_hits[counted], confidence)
                values[f"delta/{part}/{metric}_ci_low"], values[f"delta/{part}/{metric}_ci_high"] = low, high
        out.update(values)
    return out


def discordant_interval(first: np.ndarray, second: np.ndarray, confidence_level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(first) - mean(second) for paired 0/1 outcomes of n units, from the m
    discordant units alone (the concordant ones cancel): given m, the units where only
    ``first`` holds are Binomial(m, pi), and the difference is (2 pi - 1) m / n, so the
    Clopper-Pearson interval of pi maps onto it (the exact conditional interval behind
    McNemar's test). With no discordant unit, the difference lies within +-(Clopper-Pearson
    upper bound of 0 discordant in n), not at a bootstrap's [0, 0]."""
    n = len(first)
    only_first = int(((first == 1) & (second == 0)).sum())
    discordant = only_first + int(((first == 0) & (second == 1)).sum())
    if discordant == 0:
        _, bound = binomial_interval(0, n, confidence_level)
        return -bound, bound
    low, high = binomial_interval(only_first, discordant, confidence_level)
    return (2 * low - 1) * discordant / n, (2 * high - 1) * discordant / n


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

