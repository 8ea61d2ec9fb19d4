"""The calibration/held-out set checks: coverage in the model's features, and the warnings."""

from __future__ import annotations

import numpy as np

from convgraph.optimize.samples import (
    COVERAGE_RATIO, SPLIT_MARGIN, coverage, coverage_risk, features, sample_risks, split_budget,
)


def test_coverage_is_about_one_for_alike_sets_and_large_for_a_set_of_a_few_scenes():
    rng = np.random.default_rng(0)
    same = rng.normal(size=(64, 16))
    assert 0.6 < coverage(same[:32], same[32:]) < 1.5
    scenes = rng.normal(size=(3, 16))  # 32 samples near 3 points: crops of 3 photos
    few = scenes[rng.integers(0, 3, 32)] + 0.1 * rng.normal(size=(32, 16))
    other = rng.normal(size=(8, 16))  # held-out samples from elsewhere
    r = coverage(few, other)
    assert r > 3 * COVERAGE_RATIO
    assert "does not cover" in coverage_risk(r, "t") and coverage_risk(1.1, "t") is None
    # scale-free: the same sets in other units give the same ratio
    assert np.isclose(coverage(few * 1e3 + 5, other * 1e3 + 5), r)


def test_coverage_of_degenerate_sets():
    assert coverage(np.zeros((1, 4)), np.ones((3, 4))) == 1.0  # one calibration sample: nothing to compare
    assert coverage(np.zeros((4, 4)), np.zeros((2, 4))) == 1.0  # all alike, held-out too
    assert coverage(np.zeros((4, 4)), np.ones((2, 4))) == np.inf


def test_features_average_each_channel_over_batch_and_space():
    a = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(features([a, a + 1]), [a.mean(axis=(0, 2, 3)), a.mean(axis=(0, 2, 3)) + 1])


def test_sample_risks_name_what_each_risks():
    assert sample_risks(32, 16, False) == []
    small = sample_risks(4, 2, True)
    assert len(small) == 3 and "calibration" in small[0] and "held-out" in small[1] and "split off" in small[2]


def test_split_budget_divides_the_allowed_error():
    assert split_budget("cosine", 0.99) == 1 - 0.01 / SPLIT_MARGIN
    assert split_budget("top1", 0.9) == 1 - 0.1 / SPLIT_MARGIN
    assert split_budget("snr", 20.0) == 20.0 + 10 * np.log10(SPLIT_MARGIN)  # noise power ÷ SPLIT_MARGIN
