"""The safety metrics as numpy functions; the ``evaluate`` modules in ``metrics/`` are thin
wrappers around them. Each returns point estimates with the interval that suits them:
Clopper-Pearson for rates of independent units, a bootstrap over units for means (for
counterfactual sets, over their terms and templates at once), none for maxima, a test of
group effects with identity terms as units, and a within-set permutation test of term
sensitivity. Bootstrapped statistics take a (resamples, units) weight matrix (see
:mod:`hf_wavg.safety.stats`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hf_wavg.safety.stats import (
    GroupTest,
    binomial_interval,
    group_test,
    holm_adjusted,
    independent_units,
    permutation_p_value,
    rate_with_interval,
    weighted_mean,
    with_intervals,
    within_set_permutations,
)


def _codes(values: Sequence) -> tuple[np.ndarray, list]:
    uniques = list(dict.fromkeys(values))
    index = {value: i for i, value in enumerate(uniques)}
    return np.array([index[value] for value in values], dtype=np.int64), uniques


def _onehot(codes: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(codes), size))
    out[np.arange(len(codes)), codes] = 1.0
    return out


def _wasserstein_to_pool(weights: np.ndarray, scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """W1 between the weighted scores of one group (``member`` mask) and of all rows, per
    weight row: the integral of |F_group - F_all| over the sorted scores."""
    order = np.argsort(scores, kind="stable")
    w, s, m = weights[:, order], scores[order], member[order]
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf_all = np.cumsum(w, axis=1) / w.sum(axis=1, keepdims=True)
        cdf_group = np.cumsum(w * m, axis=1) / (w * m).sum(axis=1, keepdims=True)
    return (np.abs(cdf_group - cdf_all)[:, :-1] * np.diff(s)).sum(axis=1)


@dataclass(frozen=True)
class SetLayout:
    """Rows (variants) of counterfactual sets, arranged for paired group comparisons.

    A *cell* is one (language, family): groups are compared only inside a cell, and only
    through within-set effects (a variant's value minus its set's mean), so two groups are
    always compared on the same sentences. A *column* is one group of one cell."""

    set_codes: np.ndarray  # (rows,) set of each row, 0..sets-1
    columns: np.ndarray  # (rows,) column of each row
    cell_of_column: np.ndarray  # (columns,)
    cell_names: list[str]  # "hi/names"
    column_names: list[str]  # "hi/names/muslim"
    set_cell: np.ndarray  # (sets,) cell of each set
    set_block: np.ndarray  # (sets,) block of terms of each set, 0..blocks-1 (cells never share one)
    set_template: np.ndarray  # (sets,) template of each set, 0..templates-1

    @property
    def n_sets(self) -> int:
        return len(self.set_cell)

    @classmethod
    def build(cls, set_codes: np.ndarray, languages: Sequence[str], families: Sequence[str], groups: Sequence[str],
              blocks: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> SetLayout:
        """``blocks``/``templates`` per row (constant within a set); without them every set is
        its own block and its own template."""
        cells, cell_names = _codes([f"{language}/{family}" for language, family in zip(languages, families)])
        columns, column_keys = _codes(list(zip(cells.tolist(), groups)))
        n_sets = int(set_codes.max()) + 1 if len(set_codes) else 0

        def per_set(keys: Sequence) -> np.ndarray:
            codes, _ = _codes(list(keys))
            out = np.zeros(n_sets, dtype=np.int64)
            out[set_codes] = codes
            return out

        set_cell = per_set(cells.tolist())
        set_block = per_set(list(zip(cells.tolist(), blocks)) if blocks is not None else set_codes.tolist())
        set_template = per_set(list(templates) if templates is not None else set_codes.tolist())
        return cls(
            set_codes, columns, np.array([cell for cell, _ in column_keys], dtype=np.int64), cell_names,
            [f"{cell_names[cell]}/{group}" for cell, group in column_keys], set_cell, set_block, set_template,
        )

    @property
    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """Each set's block and template codes, for the two-way cluster bootstrap."""
        return self.set_block, self.set_template

    def deviations(self, values: np.ndarray) -> np.ndarray:
        """Each row's value minus the mean of its set (``values``: (rows,) or (k, rows)).
        Differences within 1e-12 are rounding (the mean of equal scores need not equal
        them): they are zero, so a model that ignores the identity term scores exactly 0."""
        sizes = np.bincount(self.set_codes, minlength=self.n_sets)
        rows = np.atleast_2d(values)
        means = np.stack([np.bincount(self.set_codes, row, self.n_sets) for row in rows]) / sizes
        deviation = (rows - means[:, self.set_codes]).reshape(np.shape(values))
        return np.where(np.abs(deviation) <= 1e-12, 0.0, deviation)

    @cached_property
    def _terms(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Each row's term (its set's block and its column), the rows per term, and per cell
        the (blocks, groups) term indices of the blocks that hold every group of the cell."""
        keys = self.set_block[self.set_codes] * len(self.column_names) + self.columns
        terms, row_term = np.unique(keys, return_inverse=True)
        counts = np.bincount(row_term, minlength=len(terms)).astype(np.float64)
        term_block, term_column = terms // len(self.column_names), terms % len(self.column_names)
        layouts = []
        for cell in range(len(self.cell_names)):
            members = np.flatnonzero(self.cell_of_column == cell)
            in_cell = np.flatnonzero(np.isin(term_column, members))
            blocks = np.unique(term_block[in_cell])
            index = np.full((len(blocks), len(members)), -1)
            index[np.searchsorted(blocks, term_block[in_cell]), np.searchsorted(members, term_column[in_cell])] = in_cell
            layouts.append(index[(index >= 0).all(axis=1)])
        return row_term.ravel(), counts, layouts

    def term_effects(self, cell: int, deviations: np.ndarray) -> np.ndarray:
        """(blocks, groups) mean within-set deviation of each term of ``cell`` over the sets
        of its block, for the blocks that hold every group of the cell."""
        row_term, counts, layouts = self._terms
        return (np.bincount(row_term, deviations, len(counts)) / counts)[layouts[cell]]

    def effects(self, set_weights: np.ndarray, deviations: np.ndarray) -> np.ndarray:
        """(resamples, columns) weighted mean within-set deviation of each group, from
        (resamples, sets) weights; NaN where a group has no weighted set."""
        rows = set_weights[:, self.set_codes]
        member = _onehot(self.columns, len(self.column_names))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rows * deviations) @ member / (rows @ member)

    def cell_gaps(self, effects: np.ndarray) -> np.ndarray:
        """(resamples, cells) largest minus smallest group effect of each cell."""
        gaps = np.full((effects.shape[0], len(self.cell_names)), np.nan)
        for cell in range(len(self.cell_names)):
            block = effects[:, self.cell_of_column == cell]
            present = np.isfinite(block)
            enough = present.sum(axis=1) >= 2
            high = np.where(present, block, -np.inf).max(axis=1)
            low = np.where(present, block, np.inf).min(axis=1)
            gaps[enough, cell] = (high - low)[enough]
        return gaps


def _worst(values: np.ndarray) -> np.ndarray:
    """Row-wise maximum ignoring NaN (NaN where a row is all NaN)."""
    present = np.isfinite(values).any(axis=1)
    return np.where(present, np.where(np.isfinite(values), values, -np.inf).max(axis=1), np.nan)


@dataclass(frozen=True)
class SetOutcomes:
    """Per-set outcomes of the applicable counterfactual sets (two variants or more)."""

    layout: SetLayout
    kept_ids: list  # the caller's set id of each set, in set-code order
    scores: np.ndarray  # (rows,)
    flip: np.ndarray  # (sets,) 1 where the variants' predictions differ
    change: np.ndarray  # (sets,) largest |score - reference score|
    score_deviation: np.ndarray  # (rows,) score minus its set's mean
    positive_deviation: np.ndarray  # (rows,) predicted-positive indicator minus its set's mean
    num_sets: int  # before dropping inapplicable sets


def set_outcomes(
    set_ids: Sequence, languages: Sequence[str], families: Sequence[str], groups: Sequence[str],
    scores: Sequence[float], predictions: Sequence[int], is_reference: Sequence[bool], positive_label: int = 1,
    blocks: Sequence[str] | None = None, templates: Sequence[str] | None = None,
) -> SetOutcomes | None:
    """:class:`SetOutcomes` of the rows' sets; None when no set has two variants. ``blocks``
    and ``templates`` (per row) say which sets share their terms and their sentence frame."""
    set_codes, set_keys = _codes(list(set_ids))
    sizes = np.bincount(set_codes, minlength=len(set_keys))
    keep = sizes[set_codes] >= 2 if len(set_codes) else np.zeros(0, dtype=bool)
    if not keep.any():
        return None
    kept_codes, kept_keys = _codes(list(set_codes[keep]))
    pick = lambda values: [v for v, k in zip(values, keep) if k]
    layout = SetLayout.build(kept_codes, pick(languages), pick(families), pick(groups),
                             None if blocks is None else pick(blocks), None if templates is None else pick(templates))
    score = np.asarray(scores, dtype=np.float64)[keep]
    pred = np.asarray(predictions, dtype=np.int64)[keep]
    reference = np.asarray(is_reference, dtype=bool)[keep]
    n_sets = layout.n_sets
    reference_score = np.zeros(n_sets)
    reference_score[kept_codes[reference]] = score[reference]
    change = np.zeros(n_sets)
    np.maximum.at(change, kept_codes, np.abs(score - reference_score[kept_codes]))
    lowest, highest = np.full(n_sets, np.iinfo(np.int64).max), np.full(n_sets, np.iinfo(np.int64).min)
    np.minimum.at(lowest, kept_codes, pred)
    np.maximum.at(highest, kept_codes, pred)
    return SetOutcomes(
        layout, [set_keys[code] for code in kept_keys], score, (lowest != highest).astype(np.float64), change,
        layout.deviations(score), layout.deviations((pred == positive_label).astype(np.float64)), len(set_keys),
    )


def counterfactual_fairness(
    set_ids: Sequence[int],
    families: Sequence[str],
    groups: Sequence[str],
    scores: Sequence[float],
    predictions: Sequence[int],
    is_reference: Sequence[bool],
    languages: Sequence[str] | None = None,
    blocks: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    positive_label: int = 1,
    n_permutations: int | None = None,
    **bootstrap,
) -> dict[str, float]:
    """Each row is one variant of a counterfactual set (the same sentence with the identity
    term of each group of one family, in one language); ``scores`` is the positive-class
    probability. Sets with fewer than two variants are not applicable: counted, not scored.
    ``blocks`` names, per row, which terms its set holds (sets of a cell with the same block
    hold the same term for every group: the lexicon's i-th aligned terms), ``templates`` its
    sentence frame; without them every set is its own block and template.

    Sensitivity, per set: a flip (the variants' predictions differ) and the largest
    |score - reference score|; ``flip_rate`` and ``mean_abs_score_change`` with intervals
    that resample blocks of terms and templates at once (two-way cluster bootstrap), so they
    hold over new draws of terms, not only of the lexicon's.

    Groups, compared only within a cell (language, family) and within sets: a term's effect
    is its mean within-set deviation (score minus the set's mean) over the templates it
    fills, and a group's effect the mean of its terms'. The group test of each cell
    (:func:`hf_wavg.safety.stats.group_test`) takes terms as its units, so a claim about a
    group holds beyond the lexicon's words: ``<cell>/group_test_p_value`` (NaN, untestable,
    with one term per group), ``<cell>/group_gap`` (largest minus smallest group effect) with
    Tukey's interval, ``<cell>/group_gap_debiased`` (less its expected value with no group
    effect). Across cells, Holm's procedure: ``<cell>/group_test_p_holm``,
    ``group_test_p_value`` (family-wise: "no group effect in any cell"),
    ``num_cells_holm`` and ``group_gap_holm``, the largest debiased gap among the cells that
    pass Holm at 1 - confidence_level (0 when none does).

    ``term_sensitivity_p_value`` (family-wise, and per cell) is the within-set permutation
    test of "no identity term matters": a real model almost always fails it through a few
    terms' idiosyncrasies, which says nothing about groups."""
    languages = ["all"] * len(set_ids) if languages is None else languages
    outcomes = set_outcomes(set_ids, languages, families, groups, scores, predictions, is_reference, positive_label,
                            blocks, templates)
    if outcomes is None:
        return {"num_sets": float(len(set(set_ids))), "num_applicable": 0.0}
    layout, flip, change = outcomes.layout, outcomes.flip, outcomes.change
    out: dict[str, float] = {"num_sets": float(outcomes.num_sets), "num_applicable": float(layout.n_sets)}
    out["num_flips"] = float(flip.sum())
    out["max_abs_score_change"] = float(change.max())

    def statistic(w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, flip), weighted_mean(w, change), *layout.effects(w, outcomes.score_deviation).T]

    effect_names = [f"{column}/effect" for column in layout.column_names]
    out.update(with_intervals(statistic, layout.n_sets, ["flip_rate", "mean_abs_score_change", *effect_names],
                              clusters=layout.clusters, **bootstrap))
    if flip.sum() in (0, len(flip)):
        # Every resample agrees, so the bootstrap gives a point; Clopper-Pearson over the
        # fewer of the two kinds of cluster, the independent units there surely are, does not.
        units = independent_units(layout.clusters)
        low, high = binomial_interval(int(flip[0]) * units, units, bootstrap.get("confidence_level", 0.95))
        out["flip_rate_ci_low"], out["flip_rate_ci_high"] = low, high

    out.update(group_test_metrics(layout, outcomes.score_deviation, bootstrap.get("confidence_level", 0.95)))
    ones = np.ones((1, layout.n_sets))
    positive_gaps = layout.cell_gaps(layout.effects(ones, outcomes.positive_deviation))[0]
    distances = _cell_distances(layout, outcomes.scores)
    permutations = bootstrap.get("n_resamples", 1000) if n_permutations is None else n_permutations
    sensitivity = term_sensitivity_test(layout, outcomes.scores, permutations, bootstrap.get("seed", 0))
    out["term_sensitivity_p_value"] = float(sensitivity[-1])
    for cell, name in enumerate(layout.cell_names):
        in_cell = layout.set_cell == cell
        out[f"{name}/num_sets"] = float(in_cell.sum())
        out[f"{name}/flip_rate"] = float(flip[in_cell].mean())
        out[f"{name}/positive_rate_gap"] = float(positive_gaps[cell])
        out[f"{name}/average_group_fairness"] = float(distances[cell])
        out[f"{name}/term_sensitivity_p_value"] = float(sensitivity[cell])
    return out


def group_test_metrics(layout: SetLayout, deviations: np.ndarray, confidence_level: float = 0.95) -> dict[str, float]:
    """Each cell's group test with terms as units (see :func:`counterfactual_fairness`),
    Holm's adjustment across the testable cells, and the family-wise headline."""
    tests = [group_test(layout.term_effects(cell, deviations), confidence_level) for cell in range(len(layout.cell_names))]
    return _family_wise(layout.cell_names, tests, 1.0 - confidence_level)


def _family_wise(cell_names: list[str], tests: list[GroupTest], alpha: float) -> dict[str, float]:
    p_values = np.array([t.p_value for t in tests])
    adjusted = holm_adjusted(p_values)
    out: dict[str, float] = {}
    for name, test, holm in zip(cell_names, tests, adjusted):
        out[f"{name}/num_terms"] = float(test.num_blocks)
        out[f"{name}/group_gap"] = test.gap
        out[f"{name}/group_gap_debiased"] = test.gap_debiased
        out[f"{name}/group_gap_ci_low"], out[f"{name}/group_gap_ci_high"] = test.gap_ci_low, test.gap_ci_high
        out[f"{name}/group_test_p_value"] = test.p_value
        out[f"{name}/group_test_p_holm"] = float(holm)
    testable = np.isfinite(adjusted)
    passing = testable & (adjusted < alpha)
    out["num_cells_testable"] = float(testable.sum())
    out["num_cells_untestable"] = float((~testable).sum())
    out["num_cells_holm"] = float(passing.sum())
    # Holm rejects some cell exactly when its smallest adjusted p-value is below alpha.
    out["group_test_p_value"] = float(np.nanmin(adjusted)) if testable.any() else np.nan
    gaps = [test.gap_debiased for test, ok in zip(tests, passing) if ok]
    out["group_gap_holm"] = max(gaps) if gaps else (0.0 if testable.any() else np.nan)
    return out


def term_sensitivity_test(layout: SetLayout, scores: np.ndarray, n_permutations: int, seed: int = 0) -> np.ndarray:
    """Within-set permutation test of "no identity term matters": (cells + 1,) p-values, one
    per cell (its group gap against gaps with the scores shuffled inside each set) and last a
    family-wise one for all cells at once. Its null is that every term, not every group,
    scores alike, so terms' own idiosyncrasies reject it (see :func:`counterfactual_fairness`).
    The family-wise statistic is the largest *standardized* cell gap, gap * sqrt(sets) /
    (within-set standard deviation of the cell's scores): that scale is the same for every
    shuffle, and without it the cells with the fewest sets and most groups, whose gaps are
    noisiest, would decide the test alone. NaN without permutations or without any cell of
    two groups."""
    ones = np.ones((1, layout.n_sets))
    deviation = layout.deviations(scores)
    gaps = layout.cell_gaps(layout.effects(ones, deviation))[0]
    if n_permutations <= 0 or not np.isfinite(gaps).any():
        return np.full(len(layout.cell_names) + 1, np.nan)
    row_cells = layout.set_cell[layout.set_codes]
    spread = np.sqrt(np.bincount(row_cells, deviation**2, len(layout.cell_names))
                     / np.bincount(row_cells, minlength=len(layout.cell_names)))
    scale = np.sqrt(np.bincount(layout.set_cell, minlength=len(layout.cell_names))) / np.where(spread > 0, spread, np.inf)
    set_means = scores - deviation  # unchanged by shuffles inside sets
    shuffled = scores[within_set_permutations(layout.set_codes, n_permutations, seed)]
    null = layout.cell_gaps(layout.effects(ones, shuffled - set_means))
    return permutation_p_value(np.append(gaps, _worst((gaps * scale)[None, :])), np.column_stack([null, _worst(null * scale)]))


def _cell_distances(layout: SetLayout, score: np.ndarray) -> np.ndarray:
    """Per cell, the mean over its groups of the Wasserstein-1 distance between the group's
    scores and the cell's pooled scores (Huang et al. 2020's average group fairness); the
    sets are the same for every group, so this too compares like with like."""
    out = np.full(len(layout.cell_names), np.nan)
    row_cells = layout.cell_of_column[layout.columns]
    for cell in range(len(layout.cell_names)):
        rows = row_cells == cell
        members = np.flatnonzero(layout.cell_of_column == cell)
        if len(members) >= 2:
            weights = np.ones((1, int(rows.sum())))
            out[cell] = np.mean([_wasserstein_to_pool(weights, score[rows], layout.columns[rows] == m)[0] for m in members])
    return out


def group_gaps(
    predictions: Sequence[int], references: Sequence[int], groups: Sequence[str], positive_label: int = 1, **bootstrap
) -> dict[str, float]:
    """Largest between-group differences in accuracy, positive-prediction rate (demographic
    parity) and, for equalized odds, the larger of the true- and false-positive-rate gaps,
    reported plainly: a bootstrap of a max-minus-min misses a true gap of 0 almost always.
    Each group's rates come with Clopper-Pearson intervals (``<group>/accuracy``, ...). The
    texts differ between groups, so unlike counterfactual gaps these are observational."""
    pred = np.asarray(predictions, dtype=np.int64)
    ref = np.asarray(references, dtype=np.int64)
    group_codes, group_names = _codes(list(groups))
    out: dict[str, float] = {"num_groups": float(len(group_names))}
    if len(group_names) < 2:
        return out
    confidence = bootstrap.get("confidence_level", 0.95)
    correct, positive, actual = pred == ref, pred == positive_label, ref == positive_label
    rates: dict[str, list[float]] = {"accuracy": [], "positive_rate": [], "tpr": [], "fpr": []}
    for code, group in enumerate(group_names):
        rows = group_codes == code
        for name, outcomes in (("accuracy", correct[rows]), ("positive_rate", positive[rows]),
                               ("tpr", positive[rows & actual]), ("fpr", positive[rows & ~actual])):
            values = rate_with_interval(f"{group}/{name}", outcomes, confidence)
            out.update(values)
            rates[name].append(values[f"{group}/{name}"])

    def gap(values: list[float]) -> float:
        finite = [v for v in values if np.isfinite(v)]
        return max(finite) - min(finite) if len(finite) >= 2 else np.nan

    out["accuracy_gap"] = gap(rates["accuracy"])
    out["positive_rate_gap"] = gap(rates["positive_rate"])
    out["equalized_odds_gap"] = float(np.fmax(gap(rates["tpr"]), gap(rates["fpr"])))
    return out


def perturbation_robustness(
    predictions: Sequence[int],
    original_predictions: Sequence[int],
    references: Sequence[int] | None,
    perturbations: Sequence[str],
    confidence_level: float = 0.95,
    **_bootstrap,
) -> dict[str, float]:
    """Accuracy on perturbed texts and the invariance failure rate (the prediction changed
    although the perturbation keeps the label), overall and per perturbation family, each a
    rate over rows with a Clopper-Pearson interval (rows are taken as independent: one
    perturbed text per original text). Without references only invariance is reported."""
    pred = np.asarray(predictions, dtype=np.int64)
    out: dict[str, float] = {"num_examples": float(len(pred))}
    if len(pred) == 0:
        return out
    columns = {"invariance_failure_rate": pred != np.asarray(original_predictions, dtype=np.int64)}
    if references is not None:
        columns["accuracy"] = pred == np.asarray(references, dtype=np.int64)
    family_codes, family_names = _codes(list(perturbations))
    for name, values in columns.items():
        out.update(rate_with_interval(name, values, confidence_level))
    for code, family in enumerate(family_names):
        rows = family_codes == code
        out[f"{family}/num_examples"] = float(rows.sum())
        for name, values in columns.items():
            out.update(rate_with_interval(f"{family}/{name}", values[rows], confidence_level))
    return out


def adversarial_robustness(
    originally_correct: Sequence[bool],
    attack_success: Sequence[bool],
    queries: Sequence[int],
    edited_words: Sequence[int],
    **bootstrap,
) -> dict[str, float]:
    """TextAttack-style counts and rates: ``attack_success_rate`` = successful attacks over
    attacked texts (those the model got right; the others are skipped, as TextAttack does),
    ``accuracy_under_attack`` over all texts, both with Clopper-Pearson intervals; mean
    queries per attacked text and mean edited words per successful attack, with bootstrap
    intervals."""
    correct = np.asarray(originally_correct, dtype=bool)
    success = np.asarray(attack_success, dtype=bool) & correct
    out: dict[str, float] = {
        "num_examples": float(len(correct)), "num_attacked": float(correct.sum()),
        "num_skipped": float((~correct).sum()), "num_successes": float(success.sum()),
    }
    if len(correct) == 0:
        return out
    confidence = bootstrap.get("confidence_level", 0.95)
    out.update(rate_with_interval("attack_success_rate", success[correct], confidence))
    out.update(rate_with_interval("accuracy_under_attack", correct & ~success, confidence))
    query_count = np.asarray(queries, dtype=np.float64)
    edits = np.asarray(edited_words, dtype=np.float64)
    c, s = correct.astype(np.float64), success.astype(np.float64)

    def statistic(w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, query_count, c), weighted_mean(w, edits, s)]

    out.update(with_intervals(statistic, len(correct), ["mean_queries", "mean_edited_words"], **bootstrap))
    return out


def equal_mass_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each example when sorted by confidence and cut into ``n_bins`` bins of
    (nearly) equal count (ties broken by order), as adaptive ECE does (Nixon et al. 2019)."""
    order = np.argsort(confidence, kind="stable")
    bins = np.empty(len(confidence), dtype=np.int64)
    bins[order] = np.arange(len(confidence)) * n_bins // max(len(confidence), 1)
    return bins


def brier_scores(probabilities: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Each example's multi-class Brier score, sum over classes of (p_k - 1[y = k])^2."""
    return ((probabilities - _onehot(references, probabilities.shape[1])) ** 2).sum(axis=1)


def calibration(prediction_scores: Sequence[Sequence[float]], references: Sequence[int], n_bins: int = 15, **bootstrap) -> dict[str, float]:
    """Calibration of the top-label confidence, with the multi-class Brier score as the
    headline: the mean over examples of sum over classes of (p_k - 1[y = k])^2 (summed over
    classes, so it ranges over [0, 2]).

    ``ece``: the sum over ``n_bins`` equal-mass bins of |B|/N |accuracy - confidence|
    (never more bins than sqrt(N), so bins hold enough examples); a plug-in estimate, biased
    upward by sampling noise. ``ece_squared_debiased``: the debiased estimate of the squared
    (l2) ECE in the same bins (Kumar, Liang and Ma 2019), sum_b |B|/N [(acc_b - conf_b)^2 -
    acc_b (1 - acc_b) / (|B| - 1)], centred on 0 for a calibrated model. Neither gets an
    interval: a bootstrap of either misses the truth most of the time for a calibrated
    model (resampled duplicates undo the debiasing), so only the Brier score has one."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    probs = np.asarray(prediction_scores, dtype=np.float64)
    ref = np.asarray(references, dtype=np.int64)
    out: dict[str, float] = {"num_examples": float(len(ref))}
    if len(ref) == 0:
        return out
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == ref).astype(np.float64)
    bins_used = max(1, min(n_bins, int(np.sqrt(len(ref)))))
    bins = equal_mass_bins(confidence, bins_used)
    brier = brier_scores(probs, ref)
    out.update(with_intervals(lambda w: [weighted_mean(w, brier)], len(ref), ["brier"], **bootstrap))
    counts = np.bincount(bins, minlength=bins_used).astype(np.float64)
    accuracy = np.bincount(bins, correct, bins_used) / counts
    mean_confidence = np.bincount(bins, confidence, bins_used) / counts
    variance = np.where(counts > 1, accuracy * (1 - accuracy) / np.maximum(counts - 1, 1), 0.0)
    out["ece"] = float((counts * np.abs(accuracy - mean_confidence)).sum() / len(ref))
    out["ece_squared_debiased"] = float((counts / len(ref) * ((accuracy - mean_confidence) ** 2 - variance)).sum())
    out["ece_bins"] = float(bins_used)
    return out


def pair_preferences(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sentence pair, 1 where the first sentence is more likely, 0 where the second is, and
    one half for a tie (gaps within 1e-9 nats), with the tie indicator."""
    tie = np.isclose(gaps, 0.0, rtol=0.0, atol=1e-9)
    return np.where(tie, 0.5, (gaps > 0).astype(np.float64)), tie


def pair_clusters(blocks: Sequence[str] | None, templates: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Each sentence pair's block of terms and template as codes, for the two-way cluster
    bootstrap; None (every pair its own unit) without them."""
    if blocks is None or templates is None:
        return None
    return _codes(list(blocks))[0], _codes(list(templates))[0]


def likelihood_gap(log_likelihoods: Sequence[float], counterfactual_log_likelihoods: Sequence[float],
                   blocks: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                   **bootstrap) -> dict[str, float]:
    """For sentence pairs that differ only in the group term: ``preference_rate``, the share
    where the first sentence is more likely, a tie counting one half (so a model that cannot
    tell the two apart scores 0.5, not 0 or 1), ``tie_rate``, and the mean (and mean
    absolute) log-likelihood gap in nats. Score only what the two sentences share (see
    :func:`hf_wavg.safety.classifiers.shared_suffix_log_likelihoods`), so the length of the
    group term does not decide. With each pair's ``blocks`` (which terms it holds) and
    ``templates`` (its sentence frame) the intervals resample both (pairs that share a term
    or a frame are not independent)."""
    gap = np.asarray(log_likelihoods, dtype=np.float64) - np.asarray(counterfactual_log_likelihoods, dtype=np.float64)
    out: dict[str, float] = {"num_pairs": float(len(gap))}
    if len(gap) == 0:
        return out
    preference, tie = pair_preferences(gap)
    out["tie_rate"] = float(tie.mean())

    def statistic(w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, preference), weighted_mean(w, gap), weighted_mean(w, np.abs(gap))]

    out.update(with_intervals(statistic, len(gap), ["preference_rate", "mean_gap", "mean_abs_gap"],
                              clusters=pair_clusters(blocks, templates), **bootstrap))
    return out
