"""The choice under a latency budget and a quality target, on trial rows (no Ray): the smallest
trial that meets both, else an error naming the trial closest to meeting them."""
from __future__ import annotations

import pytest

from workflows.stages.search import pick_under_budget

TRIALS = [{"trial_id": "a", "params": 3570, "latency_ms": 0.016, "quality": 0.93},
          {"trial_id": "b", "params": 2474, "latency_ms": 0.015, "quality": 0.62},
          {"trial_id": "c", "params": 4858, "latency_ms": 0.018, "quality": 0.97},
          {"trial_id": "d", "params": 3570, "latency_ms": 0.014, "quality": 0.95}]


def test_the_smallest_then_fastest_trial_that_meets_both_is_chosen():
    got = pick_under_budget(TRIALS, 0.017, 0.9, lm=False)
    assert got["chosen_trial"] == "d" and got["met"] == 2  # a and d meet; same size, d is faster
    assert pick_under_budget(TRIALS, None, 0.5, lm=False)["chosen_trial"] == "b"  # no latency budget
    assert pick_under_budget(TRIALS, 0.0145, None, lm=False)["chosen_trial"] == "d"


def test_none_meets_names_the_closest_and_by_how_much():
    # relative misses: a 0.041 + 0.6, b 0.36 + 0.5, c 0 + 0.8, d 0.021 + 0.4 → d
    with pytest.raises(ValueError) as e:
        pick_under_budget(TRIALS, 0.01, 0.97, lm=False)
    assert "the closest, trial d (3,570 params)" in str(e.value)
    assert "quality 0.9500" in str(e.value) and "(target ≥ 0.97)" in str(e.value)
    assert "0.014 ms (budget 0.01 ms)" in str(e.value)


def test_lm_quality_is_a_perplexity_ceiling():
    rows = [{"trial_id": "x", "params": 10, "latency_ms": 1.0, "quality": 80.0},
            {"trial_id": "y", "params": 20, "latency_ms": 1.0, "quality": 55.0}]
    assert pick_under_budget(rows, None, 60.0, lm=True)["chosen_trial"] == "y"
    with pytest.raises(ValueError, match=r"trial y .*55\.0000 validation perplexity \(target ≤ 50\.0\)"):
        pick_under_budget(rows, None, 50.0, lm=True)
