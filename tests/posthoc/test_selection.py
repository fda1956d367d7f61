"""The best setting of a sweep: by the metric's direction, ties broken as asked, gaps skipped."""

from __future__ import annotations

import math

import pytest

from hf_wavg.posthoc.selection import best_setting

SWEEP = [0.2, 0.4, 0.6, 0.8]
METRICS = [{"accuracy": 0.7, "loss": 0.5}, {"accuracy": 0.9, "loss": 0.3}, {"accuracy": 0.9, "loss": 0.3},
           {"accuracy": math.nan, "loss": 0.1}]


def test_direction_ties_and_missing_values():
    assert best_setting(SWEEP, METRICS, "accuracy") == 0.4  # the first of the tie; NaN passed over
    assert best_setting(SWEEP, METRICS, "accuracy", ties_to_larger=True) == 0.6
    assert best_setting(SWEEP, METRICS, "loss") == 0.8  # a loss is minimised
    assert best_setting(SWEEP, METRICS, "loss", greater_is_better=True) == 0.2
    with pytest.raises(KeyError, match="no alpha has a finite 'f1'"):
        best_setting(SWEEP, METRICS, "f1", name="alpha")
