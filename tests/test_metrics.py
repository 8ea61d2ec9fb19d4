"""convgraph.run.metrics: per-sample judging and references that say nothing."""

from __future__ import annotations

import numpy as np
import pytest

from convgraph.run.metrics import compare, degenerate


def _noise(seed, n=4096):
    return np.random.default_rng(seed).standard_normal(n)


def test_degenerate_references():
    assert degenerate(np.full(100, 2e-5)) .startswith("every value within")
    assert degenerate(np.full(100, 3.0)).startswith("constant")
    sat = np.ones(5000)
    sat[:2] = 0.5
    assert degenerate(sat).startswith("saturated")
    assert degenerate(np.array([np.nan, np.inf])) == "no finite value"
    assert degenerate(_noise(0)) is None
    assert degenerate(np.array([3.0])) is None  # one value: elementwise checks still mean something
    assert degenerate(np.full(10, 1e-6), tiny=1e-9) .startswith("constant")  # a smaller atol: not tiny any more
    assert degenerate(np.linspace(0, 1e-6, 10), tiny=1e-9) is None


def test_cosine_zero_on_a_near_zero_reference_is_never_a_pass():
    """PP-OCR det on uniform noise: a map of ~2e-5 everywhere; a candidate of zeros had cosine 0 and passed."""
    ref = np.abs(_noise(1)) * 1e-5
    m = compare(ref, np.zeros_like(ref))
    assert m.cosine == 0.0 and not m.passed and m.inconclusive and m.verdict == "inconclusive"
    assert m.degenerate_samples == [0] and "within 0.0001 of 0" in m.degenerate_reason
    assert compare(ref, ref.copy()).passed  # identical is identical, informative or not
    far = compare(ref, ref + 1.0)  # a difference beyond tolerance is seen even on a degenerate reference
    assert far.verdict == "failed" and not far.inconclusive


def test_the_worst_sample_counts_not_the_pooled_cosine():
    strong = [10 * _noise(i) for i in range(4)]
    weak = _noise(9) * 0.01
    refs = strong + [weak]
    cands = [r.copy() for r in strong] + [-weak]  # the weak sample is broken: cosine -1
    m = compare(refs, cands, min_cosine=0.99)
    assert m.pooled_cosine > 0.999  # the strong samples hide it in a pooled figure
    assert m.cosine == pytest.approx(-1.0) and m.worst_sample == 4 and not m.passed
    assert m.sample_cosine[:4] == [1.0] * 4 and m.sample_snr_db[4] < 0


def test_uninformative_samples_are_left_out_and_counted():
    refs = [_noise(0), np.zeros(4096)]
    m = compare(refs, [refs[0] * 1.001, np.full(4096, 1e-6)], min_cosine=0.99)
    assert m.passed and m.degenerate_samples == [1] and m.sample_cosine[1] is None
    assert m.cosine == pytest.approx(1.0)
