"""convgraph.fit: data-aware fits against weight fits, bias correction, reference targets, held-out choice."""

from __future__ import annotations


import numpy as np
import pytest

from convgraph import ModelError, fit
from convgraph.fit.calibration import ConvStats, patches
from helpers import smooth_inputs, yolo_layer

KERNEL, PADS = (3, 3), (1, 1, 1, 1)


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, group: int = 1, strides=(1, 1), pads=PADS) -> np.ndarray:
    """Reference conv through the same patch view (float64)."""
    p = patches(x.astype(np.float64), w.shape[2:], strides, pads, (1, 1))
    n, c = p.shape[:2]
    pg = p.reshape(n, group, c // group, *p.shape[2:])
    wg = w.reshape(group, w.shape[0] // group, *w.shape[1:])
    y = np.einsum("ngchwij,gocij->ngohw", pg, wg).reshape(n, w.shape[0], *p.shape[2:4])
    return y + b[None, :, None, None]


def stats_of(x, c, group=1, holdout=False, **kw) -> ConvStats:
    s = ConvStats.empty("c", c, KERNEL, pads=PADS, group=group, holdout=holdout, **kw)
    for i in range(len(x)):
        s.update(x[i:i + 1])
    return s


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_weight_fit_is_the_rules_svd_and_exact_at_full_rank():
    from convgraph.rules.separable import factor

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3))
    for r in (1, 2, 6):
        f = fit.separable_fit(w, None, r, None)
        dw, pw, err = factor(w, 1, r)
        rule_w = np.einsum("gcor,gcrk->gock", pw, dw).reshape(6, 4, 3, 3)
        np.testing.assert_allclose(f.weight(KERNEL, 1), rule_w, atol=1e-12)
        assert f.method == "weights"
        assert rel(w, f.weight(KERNEL, 1)) == pytest.approx(err, abs=1e-12)
    np.testing.assert_allclose(fit.separable_fit(w, None, 9, None).weight(KERNEL, 1), w, atol=1e-12)


def test_whitened_fit_beats_weight_fit_and_keeps_the_mean_output():
    rng = np.random.default_rng(1)
    x = smooth_inputs(rng, 6, 8, 12, mixing=False)
    w, b = rng.standard_normal((10, 8, 3, 3)), rng.standard_normal(10)
    s = stats_of(x, 8, full_max=0)  # no full covariance: the whitened SVD alone
    y = conv(x, w, b)
    for r in (1, 2, 4):
        fw, fd = fit.separable_fit(w, b, r, None), fit.separable_fit(w, b, r, s)
        assert fd.method == "whitened"
        yw, yd = conv(x, fw.weight(KERNEL, 1), fw.bias), conv(x, fd.weight(KERNEL, 1), fd.bias)
        assert rel(y, yd) < 0.8 * rel(y, yw), r
        # bias correction: the mean of each output channel is kept on the calibration data
        np.testing.assert_allclose(yd.mean(axis=(0, 2, 3)), y.mean(axis=(0, 2, 3)), atol=1e-9)
        assert fit.layer_error(w, fd.weight(KERNEL, 1), s) < fit.layer_error(w, fw.weight(KERNEL, 1), s)
    full = fit.separable_fit(w, b, 9, s)
    assert full.method == "exact"
    np.testing.assert_allclose(full.weight(KERNEL, 1), w, atol=1e-10)


def test_als_uses_cross_channel_correlation_and_layer_error_predicts_it():
    rng = np.random.default_rng(2)
    x = smooth_inputs(rng, 6, 8, 14, mixing=True)
    w, b = rng.standard_normal((12, 8, 3, 3)), rng.standard_normal(12)
    s = stats_of(x, 8)
    y = conv(x, w, b)
    white = fit.separable_fit(w, b, 1, s, als_iters=0)
    als = fit.separable_fit(w, b, 1, s, select=False)
    assert (white.method, als.method) == ("whitened", "als")
    e_white = rel(y, conv(x, white.weight(KERNEL, 1), white.bias))
    e_als = rel(y, conv(x, als.weight(KERNEL, 1), als.bias))
    assert e_als < 0.7 * e_white
    # layer_error on the full covariance is the centered output error, exactly
    yc = y - y.mean(axis=(0, 2, 3), keepdims=True)
    got = conv(x, als.weight(KERNEL, 1), als.bias)
    assert fit.layer_error(w, als.weight(KERNEL, 1), s) == pytest.approx(rel(yc, yc - (y - got)), rel=1e-6)


def test_held_out_batches_choose_between_methods():
    """Few positions for a 216-dim patch of independent channels: whole-patch least squares overfits
    (worse than the whitened SVD on new data), and the held-out half of the batches says so."""
    rng = np.random.default_rng(3)
    c = 24
    few = smooth_inputs(rng, 6, c, 4, mixing=False)  # 96 patches
    many = smooth_inputs(rng, 8, c, 24, mixing=True)  # 4608 patches of a low-dimensional signal
    test = smooth_inputs(rng, 4, c, 16, mixing=False)
    w, b = rng.standard_normal((16, c, 3, 3)), rng.standard_normal(16)
    for x, best in ((few, "whitened"), (many, "als")):
        f = fit.separable_fit(w, b, 2, stats_of(x, c, holdout=True))
        assert set(f.scores) == {"whitened", "pointwise-ls", "als"}
        assert f.method == min(f.scores, key=f.scores.get) == best
    few_stats = stats_of(few, c, holdout=True)
    chosen = fit.separable_fit(w, b, 2, few_stats)
    forced = fit.separable_fit(w, b, 2, few_stats, select=False)
    y = conv(test, w, b)
    assert forced.method == "als"
    e_chosen = rel(y, conv(test, chosen.weight(KERNEL, 1), chosen.bias))
    assert e_chosen < 0.5 * rel(y, conv(test, forced.weight(KERNEL, 1), forced.bias))


def test_holdout_score_without_reference_is_the_mean_squared_error():
    rng = np.random.default_rng(4)
    x = smooth_inputs(rng, 4, 3, 8, mixing=False)
    w, b = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    w2, b2 = w + 0.1 * rng.standard_normal(w.shape), b + 0.2
    s = stats_of(x, 3)
    mse = np.mean(np.sum((conv(x, w, b) - conv(x, w2, b2)) ** 2, axis=1))
    assert fit.holdout_score(w, b, w2, b2, s) == pytest.approx(mse, rel=1e-6)


def test_reference_statistics_correct_an_upstream_change():
    """The candidate model's input is an affine distortion of the original's (as after an approximate
    rewrite upstream): a fit targeting the original output on the original input undoes it."""
    rng = np.random.default_rng(5)
    xr = smooth_inputs(rng, 6, 4, 12, mixing=False)
    x = (0.5 * xr + 0.25).astype(np.float32)
    w, b = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)
    valid = (0, 0, 0, 0)  # zero padding is not an affine image of the original's: no pads here
    s = ConvStats.empty("c", 4, KERNEL, pads=valid, reference=True)
    for i in range(len(x)):
        s.update(x[i:i + 1], ref=xr[i:i + 1])
    y_ref = conv(xr, w, b, pads=valid)
    full = fit.separable_fit(w, b, 9, s, damp=1e-9)
    assert rel(y_ref, conv(x, full.weight(KERNEL, 1), full.bias, pads=valid)) < 1e-5
    taps, bias = fit.subgrid_fit(w, b, np.arange(9), s, damp=1e-9)
    assert rel(y_ref, conv(x, taps.reshape(w.shape), bias, pads=valid)) < 1e-5
    plain = fit.separable_fit(w, b, 9, None)
    assert rel(y_ref, conv(x, plain.weight(KERNEL, 1), plain.bias, pads=valid)) > 0.4


def test_grouped_conv_fits_per_group():
    rng = np.random.default_rng(6)
    x = smooth_inputs(rng, 4, 8, 10, mixing=True)
    w, b = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)  # group 2: 8 → 6
    s = stats_of(x, 8, group=2, holdout=True)
    y = conv(x, w, b, group=2)
    for r in (1, 2):  # 3 = C_out/g would be exact
        fw, fd = fit.separable_fit(w, b, r, None, group=2), fit.separable_fit(w, b, r, s)
        assert fd.depthwise.shape == (8, r, 9) and fd.pointwise.shape == (8, 3, r)
        ew = rel(y, conv(x, fw.weight(KERNEL, 2), fw.bias, group=2))
        ed = rel(y, conv(x, fd.weight(KERNEL, 2), fd.bias, group=2))
        assert ed < ew


def test_subgrid_fit_on_data_beats_sampling():
    rng = np.random.default_rng(7)
    x = smooth_inputs(rng, 6, 4, 12, mixing=True)
    w, b = rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    corners = np.array([0, 2, 4, 6, 8])
    y = conv(x, w, b)
    for full_max in (0, 10_000):  # per channel, then whole patches
        s = stats_of(x, 4, full_max=full_max)
        new, bias = fit.subgrid_fit(w, b, corners, s)
        emb = np.zeros((5, 4, 9))
        emb[:, :, corners] = new
        sampled = np.zeros((5, 4, 9))
        sampled[:, :, corners] = w.reshape(5, 4, 9)[:, :, corners]
        assert rel(y, conv(x, emb.reshape(w.shape), bias)) < 0.8 * rel(y, conv(x, sampled.reshape(w.shape), b))
    np.testing.assert_allclose(fit.subgrid_fit(w, b, np.arange(9), None)[0].reshape(w.shape), w)


def test_statistics_that_do_not_fit_the_weights_are_refused():
    s = ConvStats.empty("c", 4, KERNEL)
    s.update(np.ones((1, 4, 5, 5), np.float32))
    with pytest.raises(ModelError, match="do not fit weights"):
        fit.separable_fit(np.ones((2, 3, 3, 3)), None, 1, s)
    with pytest.raises(ModelError, match="no target statistics"):
        fit.target_fit(s)


# ---- a real layer on real images ------------------------------------------------------------------


@pytest.mark.real
def test_data_fit_beats_weight_fit_on_held_out_images_yolov8n(real_models, tmp_path):
    """YOLOv8n's /model.6/m.0/cv1 (64→64, 3×3) as separable rank 1 and 4: fitted on 6 sample images,
    judged on 3 others; the layer's output error must fall well below the weight fit's."""
    s, w, b, x = yolo_layer(real_models("yolov8n"), tmp_path)
    y = conv(x, w, b)
    errors = {}
    for r in (1, 4):
        fw, fd = fit.separable_fit(w, b, r, None), fit.separable_fit(w, b, r, s)
        errors[r] = (rel(y, conv(x, fw.weight(KERNEL, 1), fw.bias)), rel(y, conv(x, fd.weight(KERNEL, 1), fd.bias)))
    print("held-out relative output error, weights vs data:", errors)
    assert errors[1][1] < 0.6 * errors[1][0]
    assert errors[4][1] < 0.6 * errors[4][0]
