"""The safety metrics as numpy functions; the ``evaluate`` modules in ``metrics/`` are thin
wrappers around them. Each returns point estimates with the interval that suits them:
Clopper-Pearson for rates of independent units, a bootstrap over units (whole sets for
counterfactuals) for means, none for maxima, and a within-set permutation test for group
effects. Bootstrapped statistics take a (resamples, units) weight matrix (see
:mod:`hf_wavg.safety.stats`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hf_wavg.safety.stats import (
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

    @property
    def n_sets(self) -> int:
        return len(self.set_cell)

    @classmethod
    def build(cls, set_codes: np.ndarray, languages: Sequence[str], families: Sequence[str], groups: Sequence[str]) -> SetLayout:
        cells, cell_names = _codes([f"{language}/{family}" for language, family in zip(languages, families)])
        columns, column_keys = _codes(list(zip(cells.tolist(), groups)))
        set_cell = np.zeros(int(set_codes.max()) + 1 if len(set_codes) else 0, dtype=np.int64)
        set_cell[set_codes] = cells
        return cls(
            set_codes, columns, np.array([cell for cell, _ in column_keys], dtype=np.int64), cell_names,
            [f"{cell_names[cell]}/{group}" for cell, group in column_keys], set_cell,
        )

    def deviations(self, values: np.ndarray) -> np.ndarray:
        """Each row's value minus the mean of its set (``values``: (rows,) or (k, rows))."""
        sizes = np.bincount(self.set_codes, minlength=self.n_sets)
        means = (values @ _onehot(self.set_codes, self.n_sets)) / sizes
        return values - means[..., self.set_codes]

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


def worst_cell_gap(layout: SetLayout, set_weights: np.ndarray, deviations: np.ndarray) -> np.ndarray:
    """(resamples,) the largest cell gap of within-set ``deviations`` under set weights."""
    return _worst(layout.cell_gaps(layout.effects(set_weights, deviations)))


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
) -> SetOutcomes | None:
    """:class:`SetOutcomes` of the rows' sets; None when no set has two variants."""
    set_codes, set_keys = _codes(list(set_ids))
    sizes = np.bincount(set_codes, minlength=len(set_keys))
    keep = sizes[set_codes] >= 2 if len(set_codes) else np.zeros(0, dtype=bool)
    if not keep.any():
        return None
    kept_codes, kept_keys = _codes(list(set_codes[keep]))
    pick = lambda values: [v for v, k in zip(values, keep) if k]  # noqa: E731
    layout = SetLayout.build(kept_codes, pick(languages), pick(families), pick(groups))
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
    positive_label: int = 1,
    n_permutations: int | None = None,
    **bootstrap,
) -> dict[str, float]:
    """Each row is one variant of a counterfactual set (the same sentence with the identity
    term of each group of one family, in one language); ``scores`` is the positive-class
    probability. Sets with fewer than two variants are not applicable: counted, not scored.

    Per set: a flip (the variants' predictions differ) and the largest |score - reference
    score|. Groups are compared only within a cell (language, family) and only within sets:
    a group's effect is the mean over its cell's sets of (its score - the set's mean score),
    and a cell's ``group_gap`` the largest minus the smallest group effect (for predicted
    positives, ``positive_rate_gap``). Headline gaps are the worst cell's, reported without
    a bootstrap interval (maxima have none worth the name); ``group_gap_p_value`` is a
    within-set permutation test of "no group effect in any cell" (:func:`group_effect_test`:
    on the largest *standardized* cell gap, so its cell can differ from the headline's; each
    cell's own test is ``<cell>/group_gap_p_value``). ``flip_rate`` has a
    Clopper-Pearson interval over sets; means have cluster-bootstrap intervals (sets are
    resampled whole)."""
    languages = ["all"] * len(set_ids) if languages is None else languages
    outcomes = set_outcomes(set_ids, languages, families, groups, scores, predictions, is_reference, positive_label)
    if outcomes is None:
        return {"num_sets": float(len(set(set_ids))), "num_applicable": 0.0}
    layout, flip, change = outcomes.layout, outcomes.flip, outcomes.change
    out: dict[str, float] = {"num_sets": float(outcomes.num_sets), "num_applicable": float(layout.n_sets)}
    out.update(rate_with_interval("flip_rate", flip, bootstrap.get("confidence_level", 0.95)))
    out["num_flips"] = float(flip.sum())
    out["max_abs_score_change"] = float(change.max())

    def statistic(w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, change), *layout.effects(w, outcomes.score_deviation).T]

    effect_names = [f"{column}/effect" for column in layout.column_names]
    out.update(with_intervals(statistic, layout.n_sets, ["mean_abs_score_change", *effect_names], **bootstrap))

    ones = np.ones((1, layout.n_sets))
    gaps = layout.cell_gaps(layout.effects(ones, outcomes.score_deviation))[0]
    positive_gaps = layout.cell_gaps(layout.effects(ones, outcomes.positive_deviation))[0]
    distances = _cell_distances(layout, outcomes.scores)
    for name, values in (("group_gap", gaps), ("positive_rate_gap", positive_gaps), ("average_group_fairness", distances)):
        out[name] = float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

    permutations = bootstrap.get("n_resamples", 1000) if n_permutations is None else n_permutations
    p_values = group_effect_test(layout, outcomes.scores, permutations, bootstrap.get("seed", 0))
    out["group_gap_p_value"] = float(p_values[-1])
    for cell, name in enumerate(layout.cell_names):
        in_cell = layout.set_cell == cell
        out[f"{name}/num_sets"] = float(in_cell.sum())
        out[f"{name}/flip_rate"] = float(flip[in_cell].mean())
        out[f"{name}/group_gap"] = float(gaps[cell])
        out[f"{name}/group_gap_p_value"] = float(p_values[cell])
        out[f"{name}/positive_rate_gap"] = float(positive_gaps[cell])
        out[f"{name}/average_group_fairness"] = float(distances[cell])
    return out


def group_effect_test(layout: SetLayout, scores: np.ndarray, n_permutations: int, seed: int = 0) -> np.ndarray:
    """Within-set permutation test of "no group effect": (cells + 1,) p-values, one per cell
    (its group gap against gaps with the scores shuffled inside each set) and last a
    family-wise one for all cells at once. The family-wise statistic is the largest
    *standardized* cell gap, gap * sqrt(sets) / (within-set standard deviation of the
    cell's scores): that scale is the same for every shuffle, and without it the cells with
    the fewest sets and most groups, whose gaps are noisiest, would decide the test alone.
    NaN without permutations or without any cell of two groups."""
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


def likelihood_gap(log_likelihoods: Sequence[float], counterfactual_log_likelihoods: Sequence[float], **bootstrap) -> dict[str, float]:
    """For sentence pairs that differ only in the group term: ``preference_rate``, the share
    where the first sentence is more likely, a tie counting one half (so a model that cannot
    tell the two apart scores 0.5, not 0 or 1), ``tie_rate``, and the mean (and mean
    absolute) log-likelihood gap in nats. Score only what the two sentences share (see
    :func:`hf_wavg.safety.classifiers.shared_suffix_log_likelihoods`), so the length of the
    group term does not decide."""
    gap = np.asarray(log_likelihoods, dtype=np.float64) - np.asarray(counterfactual_log_likelihoods, dtype=np.float64)
    out: dict[str, float] = {"num_pairs": float(len(gap))}
    if len(gap) == 0:
        return out
    tie = np.isclose(gap, 0.0, rtol=0.0, atol=1e-9)
    preference = np.where(tie, 0.5, (gap > 0).astype(np.float64))
    out["tie_rate"] = float(tie.mean())

    def statistic(w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, preference), weighted_mean(w, gap), weighted_mean(w, np.abs(gap))]

    out.update(with_intervals(statistic, len(gap), ["preference_rate", "mean_gap", "mean_abs_gap"], **bootstrap))
    return out
