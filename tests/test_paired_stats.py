"""The quality benchmark's paired interval (benchmarks/paired_stats.py), checked by
simulation: a planted difference is covered about 95% of the time and a null one is flagged
about 5% of the time, whether test-set luck or seed noise dominates."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.paired_stats import mean_difference, paired_effect, smallest_resolvable


def simulate(effect: float, seed_noise: float, simulations: int, n_units: int = 300, n_seeds: int = 5):
    """Each simulation draws a test set (each unit's chance of being right, at most 0.9, so no
    probability is clipped) and five seeds of paired 0/1 outcomes: the reference is right with
    chance p, the method with p + effect + this seed's own shift."""
    rng = np.random.default_rng(12345)
    covered = flagged = 0
    for k in range(simulations):
        p = 0.1 + 0.8 * rng.beta(4, 1.5, n_units)
        per_seed = []
        for _ in range(n_seeds):
            shift = rng.normal(0, seed_noise)
            shared = rng.random(n_units)  # couples the two methods' outcomes, as on real data
            per_seed.append(mean_difference(shared < p + effect + shift, shared < p))
        interval = paired_effect(per_seed, n_units, replicates=400, seed=k)
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
