"""The quality benchmark's paired interval (benchmarks/paired_stats.py), checked by
simulation: a planted difference is covered about 95% of the time and a null one is flagged
about 5% of the time, whether test-set luck or seed noise dominates; its p-value is the level
at which the interval touches 0; and Benjamini-Hochberg over a whole table of the
benchmark's shape keeps the false discovery rate of its bold cells at 5% or below."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.paired_stats import mean_difference, paired_effect, q_values, smallest_resolvable


def seed_differences(rng: np.random.Generator, p: np.ndarray, effect: float, seed_noise: float, n_seeds: int,
                     agreement: float = 0.0) -> list:
    """Five seeds of paired 0/1 outcomes: the reference is right with chance p, the method with
    p + effect + this seed's own shift; the two share their uniform draw (as real methods share
    most predictions with the last weights) except on a share 1 - ``agreement``... of units."""
    per_seed = []
    for _ in range(n_seeds):
        shift = rng.normal(0, seed_noise)
        shared = rng.random(len(p))
        own = np.where(rng.random(len(p)) < agreement, shared, rng.random(len(p))) if agreement else shared
        per_seed.append(mean_difference(own < p + effect + shift, shared < p))
    return per_seed


def simulate(effect: float, seed_noise: float, simulations: int, n_units: int = 300, n_seeds: int = 5):
    """Each simulation draws a test set (each unit's chance of being right, at most 0.9, so no
    probability is clipped) and five seeds of paired 0/1 outcomes: the reference is right with
    chance p, the method with p + effect + this seed's own shift."""
    rng = np.random.default_rng(12345)
    covered = flagged = 0
    for k in range(simulations):
        p = 0.1 + 0.8 * rng.beta(4, 1.5, n_units)
        interval = paired_effect(seed_differences(rng, p, effect, seed_noise, n_seeds), n_units, replicates=400, seed=k)
        covered += interval["ci_low"] <= effect <= interval["ci_high"]
        flagged += not interval["ci_low"] <= 0.0 <= interval["ci_high"]
    return covered / simulations, flagged / simulations


@pytest.mark.parametrize("seed_noise", [0.005, 0.02])
def test_planted_difference_is_covered(seed_noise):
    coverage, _ = simulate(0.03, seed_noise, simulations=300)
    assert 0.90 <= coverage <= 0.99


@pytest.mark.parametrize("seed_noise", [0.005, 0.02])
def test_false_alarms_stay_near_five_percent(seed_noise):
    _, alarms = simulate(0.0, seed_noise, simulations=300)
    assert alarms <= 0.09


def test_point_is_the_mean_of_the_seeds_differences():
    rng = np.random.default_rng(0)
    pairs = [(rng.random(50) < 0.7, rng.random(50) < 0.6) for _ in range(3)]
    result = paired_effect([mean_difference(a, b) for a, b in pairs], 50, replicates=50)
    assert result["mean"] == pytest.approx(np.mean([a.mean() - b.mean() for a, b in pairs]))
    assert result["ci_low"] <= result["mean"] <= result["ci_high"]


def test_smallest_resolvable_difference_is_the_80_percent_power_distance():
    # An interval of half-width 1.96 sigma detects a true difference of 2.80 sigma 80% of the time.
    assert smallest_resolvable([1.96, 1.96, float("nan")]) == pytest.approx(1.96 + 0.8416, abs=1e-3)


@pytest.mark.parametrize("seed_noise", [0.0, 0.02])
def test_p_value_is_the_level_at_which_the_interval_touches_zero(seed_noise):
    rng = np.random.default_rng(7)
    p = 0.1 + 0.8 * rng.beta(4, 1.5, 200)
    per_seed = seed_differences(rng, p, 0.02, seed_noise, 5)
    result = paired_effect(per_seed, 200, replicates=300)
    assert 0 < result["p_value"] < 1
    touching = paired_effect(per_seed, 200, replicates=300, confidence_level=1 - result["p_value"])
    assert min(abs(touching["ci_low"]), abs(touching["ci_high"])) == pytest.approx(0, abs=1e-9)
    # ... and the 95% interval excludes 0 exactly when p < 0.05.
    assert (result["ci_low"] > 0 or result["ci_high"] < 0) == (result["p_value"] < 0.05)


def test_q_values_are_benjamini_hochberg_step_up():
    p = {"a": 0.001, "b": 0.008, "c": 0.039, "d": 0.041, "e": 0.6, "f": float("nan")}
    finite = sorted(v for v in p.values() if np.isfinite(v))
    m = len(finite)
    # Textbook: q_(i) = min over j >= i of p_(j) * m / j.
    expected = [min(finite[j] * m / (j + 1) for j in range(i, m)) for i in range(m)]
    q = q_values(p)
    assert [q[k] for k in sorted((k for k in p if np.isfinite(p[k])), key=p.get)] == pytest.approx(expected)
    assert np.isnan(q["f"])


def simulate_table(rng: np.random.Generator, planted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One table of the e5 benchmark's shape (8 methods x 8 interval columns, 5 seeds, 300
    units) with noise like real models': each column its own base rates, seed noise (0.005 or
    0.02) and agreement with the last weights; a cell's effect is ``planted`` (0: null).
    Returns each cell's p-value and whether its effect is real."""
    n_methods, n_columns = planted.shape
    p_values = np.empty(planted.shape)
    for column in range(n_columns):
        p = 0.1 + 0.8 * rng.beta(4, 1.5, 300)
        seed_noise = (0.005, 0.02)[column % 2]
        agreement = (0.0, 0.8)[column // 4]
        for method in range(n_methods):
            per_seed = seed_differences(rng, p, planted[method, column], seed_noise, 5, agreement)
            p_values[method, column] = paired_effect(per_seed, 300, replicates=200, seed=k)["p_value"]
    return p_values, planted != 0


def bold_cells(p_values: np.ndarray) -> np.ndarray:
    q = q_values({index: float(value) for index, value in np.ndenumerate(p_values)})
    return np.array([[q[(i, j)] < 0.05 for j in range(p_values.shape[1])] for i in range(p_values.shape[0])])


@pytest.mark.slow
def test_all_null_tables_have_a_bold_cell_at_most_five_percent_of_the_time():
    # With every cell null, every bold cell is false: the false discovery rate is the share of
    # tables with any bold cell. Nominal 5% intervals would flag about 3 cells per table.
    rng = np.random.default_rng(2026)
    tables, any_bold, nominal = 150, 0, 0
    for k in range(tables):
        p_values, _ = simulate_table(rng, np.zeros((8, 8)), k)
        any_bold += bold_cells(p_values).any()
        nominal += (p_values < 0.05).sum()
    assert any_bold / tables <= 0.07  # 5% plus under two binomial standard errors (1.8%)
    assert 0.03 <= nominal / (tables * 64) <= 0.07  # ... while each cell alone is flagged ~5% of the time


@pytest.mark.slow
def test_tables_with_real_effects_keep_the_false_discovery_proportion_at_five_percent():
    rng = np.random.default_rng(31)
    planted = np.zeros((8, 8))
    planted[:2, :] = 0.05  # two methods change every column; the rest change nothing
    proportions, found = [], []
    for k in range(80):
        p_values, real = simulate_table(rng, planted, k)
        bold = bold_cells(p_values)
        proportions.append((bold & ~real).sum() / max(bold.sum(), 1))
        found.append((bold & real).sum() / real.sum())
    assert np.mean(proportions) <= 0.06
    assert np.mean(found) >= 0.5  # and the planted cells are mostly found


def test_seeds_that_differ_alike_by_chance_keep_the_example_noise():
    # Seed k flips unit k alone, in the method's favour: every seed differs by exactly 1 in 100,
    # so the spread over seeds is 0, yet 5 discordant units of 500 are weak evidence (a sign
    # test gives p = 0.0625). A bare t test over seeds gives an interval of width 0 and p ~ 0.
    reference = np.zeros(100)
    per_seed = []
    for k in range(5):
        method = np.zeros(100)
        method[k] = 1
        per_seed.append(mean_difference(method, reference))
    result = paired_effect(per_seed, 100, replicates=1000)
    assert result["mean"] == pytest.approx(0.01)
    assert result["p_value"] > 0.01 and result["ci_high"] - result["ci_low"] > 0.01


def test_clustered_test_set_luck_is_covered_over_new_draws_of_terms_and_templates():
    """Counterfactual sets share blocks of terms (8) and templates (6): each set's difference
    is the effect plus its block's and template's offsets plus its own, the same in every seed.
    The interval resampling both kinds of cluster (widened for their few number) covers the
    effect averaged over new blocks and templates in 90-99% of 200 tables; resampling the sets
    as if independent covers it far less often."""
    blocks, templates = np.repeat(np.arange(8), 6), np.tile(np.arange(6), 8)
    rng = np.random.default_rng(21)
    covered: dict[bool, list[bool]] = {True: [], False: []}
    for k in range(200):
        luck = rng.normal(0, 0.05, 8)[blocks] + rng.normal(0, 0.03, 6)[templates] + rng.normal(0, 0.02, 48)
        per_seed = [mean_difference(0.1 + luck + rng.normal(0, 0.02, 48), np.zeros(48)) for _ in range(5)]
        for clustered in (True, False):
            interval = paired_effect(per_seed, 48, replicates=400, seed=k,
                                     clusters=(blocks, templates) if clustered else None)
            covered[clustered].append(interval["ci_low"] <= 0.1 <= interval["ci_high"])
    assert 0.90 <= np.mean(covered[True]) <= 0.99, np.mean(covered[True])
    assert np.mean(covered[False]) < 0.7, np.mean(covered[False])
