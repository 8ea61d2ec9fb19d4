"""convgraph.engine.calibrate: patch extraction, streamed moments, held-out halves, cross/target moments, files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convgraph.fit import calibration
from convgraph import UsageError, load
from convgraph.analysis.analyze import analyze
from convgraph.fit.calibration import Calibration, ConvStats, patches
from convgraph.engine.calibrate import calibrate
from convgraph.fit import target_fit
from convgraph.model.weights import constant_value


def naive_patches(x, kernel, strides, pads, dilations):
    """Patches by explicit index loops: (N, C, *out, *kernel)."""
    nd = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    res = np.zeros(x.shape[:2] + tuple(out) + tuple(kernel), x.dtype)
    for o in itertools.product(*(range(v) for v in out)):
        for t in itertools.product(*(range(v) for v in kernel)):
            idx = tuple(o[i] * strides[i] + t[i] * dilations[i] for i in range(nd))
            res[(slice(None), slice(None)) + o + t] = xp[(slice(None), slice(None)) + idx]
    return res


@settings(max_examples=40, deadline=None)
@given(nd=st.integers(1, 3), k=st.integers(1, 3), s=st.integers(1, 3), d=st.integers(1, 2), p=st.integers(0, 2),
       extra=st.integers(0, 1))
def test_patches_match_index_loops(nd, k, s, d, p, extra):
    rng = np.random.default_rng(nd * 100 + k * 10 + s)
    size = d * (k - 1) + 1 + 2 + extra
    x = rng.standard_normal((2, 3) + (size,) * nd)
    kernel, strides, dil = (k,) * nd, (s,) * nd, (d,) * nd
    pads = tuple(range(p, p + nd)) + (p,) * nd  # uneven begin pads
    np.testing.assert_array_equal(patches(x, kernel, strides, pads, dil), naive_patches(x, kernel, strides, pads, dil))


def _moments(x, kernel, strides, pads, dilations):
    p = naive_patches(x.astype(np.float64), kernel, strides, pads, dilations)
    nd, c = len(kernel), x.shape[1]
    xc = np.moveaxis(p, 1, 0).reshape(c, -1, int(np.prod(kernel)))
    xf = np.moveaxis(p, 1, 1 + nd).reshape(-1, c * int(np.prod(kernel)))
    return xc, xf


def test_stats_moments_chunked_and_holdout(monkeypatch):
    monkeypatch.setattr(calibration, "CHUNK_BYTES", 2000)  # forces many row chunks
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 4, 9, 7)).astype(np.float32) for _ in range(3)]
    s = ConvStats.empty("c", 4, (3, 2), strides=(2, 1), pads=(1, 0, 1, 1), dilations=(1, 2), holdout=True)
    for b in batches:
        s.update(b)
    allx = np.concatenate(batches)
    xc, xf = _moments(allx, (3, 2), (2, 1), (1, 0, 1, 1), (1, 2))
    assert s.count == xc.shape[1] and s.batches == 3
    np.testing.assert_allclose(s.sum, xc.sum(1), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(s.sq, np.einsum("cmk,cml->ckl", xc, xc), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(s.full[0], xf.T @ xf, rtol=1e-5, atol=1e-4)  # whole patches: float32 products
    cov = np.stack([np.cov(xc[c].T, bias=True) for c in range(4)])
    np.testing.assert_allclose(s.cov(), cov, rtol=1e-9, atol=1e-9)
    # the second batch is held out; split gives the rest
    fit, held = s.split()
    _, xf1 = _moments(batches[1], (3, 2), (2, 1), (1, 0, 1, 1), (1, 2))
    np.testing.assert_allclose(held.full[0], xf1.T @ xf1, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fit.full[0] + held.full[0], s.full[0], rtol=1e-12, atol=1e-9)
    assert fit.count + held.count == s.count and held.batches == 1


def test_full_covariance_only_when_small_enough():
    s = ConvStats.empty("c", 8, (3, 3), full_max=71)
    assert s.full is None and s.sq.shape == (8, 9, 9)
    assert ConvStats.empty("c", 8, (3, 3), full_max=72).full.shape == (1, 72, 72)
    g = ConvStats.empty("c", 8, (3, 3), group=4)
    assert g.full.shape == (4, 18, 18)


@pytest.mark.parametrize("name", ["standard", "grouped", "dilated", "conv1d", "conv3d"])
def test_target_fit_recovers_each_conv_from_onnxruntime_outputs(models_dir, name):
    """Patches collected for every conv, correlated with the conv's own output as onnxruntime computes it:
    least squares must give back the conv's weights and bias — proves strides, pads (explicit and
    auto_pad), dilations, groups and 1D/3D layouts agree with onnxruntime's Conv."""
    cg = load(models_dir / f"{name}.onnx")
    recs = [r for r in analyze(cg, rewrites=False).convs]
    feeds = [{"x": np.random.default_rng(i).standard_normal(cg.shape("x")).astype(np.float32)} for i in range(8)]
    stats = calibrate(cg, feeds, reference=cg, targets={r.node_id: r.output for r in recs}, holdout=False)
    assert set(stats) == {r.node_id for r in recs}
    for r in recs:
        w, b = target_fit(stats[r.node_id], damp=0.0)
        np.testing.assert_allclose(w, constant_value(cg, r.weight), atol=2e-4, err_msg=r.node_id)
        np.testing.assert_allclose(b, constant_value(cg, r.bias), atol=2e-4, err_msg=r.node_id)
        s = stats[r.node_id]
        np.testing.assert_allclose(s.cross, s.sq, rtol=1e-12)  # the reference is the model itself


def test_dynamic_model_with_streamed_batches_of_two_sizes(models_dir):
    """auto-shaped: a dynamic model takes batches of different sizes; only the conv inputs are kept."""
    cg = load(models_dir / "dynamic.onnx", {"x": [1, 3, 16, 16]})
    rng = np.random.default_rng(0)
    feeds = iter([{"x": rng.random((2, 3, 16, 16), dtype=np.float32)},
                  {"x": rng.random((1, 3, 24, 20), dtype=np.float32)}])
    stats = calibrate(cg, feeds, nodes=["conv2_s2"])
    s = stats["conv2_s2"]
    assert list(stats) == ["conv2_s2"] and s.batches == 2
    assert s.count == 2 * 8 * 8 + 12 * 10
    assert next(feeds, None) is None  # consumed once


def test_calibrate_from_an_image_folder(models_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    stats = calibrate(models_dir / "dynamic.onnx", str(tmp_path), input_shapes={"x": [1, 3, 16, 16]},
                      input_options={"image_size": (16, 16), "mean": [0.5], "std": [0.25]})
    assert stats["conv1"].batches == 3 and stats["conv1"].count == 3 * 256
    assert abs(stats["conv1"].mean[:, 4].mean()) < 0.5  # centered by mean/std: values near 0, not near 100


def test_save_and_load_round_trip(models_dir, tmp_path):
    cg = load(models_dir / "standard.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal(cg.shape("x")).astype(np.float32)} for i in range(2)]
    stats = calibrate(cg, feeds, reference=cg)
    stats.save(tmp_path / "c.npz")
    back = Calibration.load(tmp_path / "c.npz")
    assert set(back) == set(stats) and back.info == stats.info
    for k, s in stats.items():
        t = back[k]
        assert (t.kernel, t.pads, t.count, t.batches, t.auto_pad) == (s.kernel, s.pads, s.count, s.batches, s.auto_pad)
        np.testing.assert_array_equal(t.full, s.full)
        np.testing.assert_array_equal(t.cross, s.cross)
        np.testing.assert_array_equal(t.holdout.sq, s.holdout.sq)
        assert t.holdout.count == s.holdout.count
    rec = analyze(cg, rewrites=False).record("conv7x7")
    assert back.for_conv(rec) is back["conv7x7"]
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(UsageError, match="not a convgraph calibration file"):
        Calibration.load(tmp_path / "bad.npz")


def test_merge_adds_accumulations():
    rng = np.random.default_rng(2)
    a, b, both = (ConvStats.empty("c", 2, (3,), pads=(1, 1), holdout=True) for _ in range(3))
    xs = [rng.standard_normal((1, 2, 10)) for _ in range(4)]
    for x in xs[:2]:
        a.update(x)
    for x in xs[2:]:
        b.update(x)
    for x in xs:
        both.update(x)
    a.merge(b)
    np.testing.assert_allclose(a.full, both.full)
    assert a.count == both.count and a.holdout.count == both.holdout.count


def test_usage_errors(models_dir):
    cg = load(models_dir / "standard.onnx")
    with pytest.raises(UsageError, match="no conv 'nope'"):
        calibrate(cg, iter([]), nodes=["nope"])
    with pytest.raises(UsageError, match="empty"):
        calibrate(cg, iter([]))
    with pytest.raises(UsageError, match="targets need a reference"):
        calibrate(cg, iter([]), targets={"conv3x3": "y"})
    sample = load(models_dir / "sample.onnx")
    with pytest.raises(UsageError, match="ConvTranspose is not a float Conv"):
        calibrate(sample, iter([]), nodes=["up/deconv"])


def test_reference_with_other_activations_gives_cross_moments():
    """A candidate whose input differs from the reference's: cross = Σ x_ref x_candᵀ."""
    rng = np.random.default_rng(3)
    xr = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    s = ConvStats.empty("c", 2, (3, 3), pads=(1, 1, 1, 1), reference=True)
    s.update(xr * 0.5 + 1, ref=xr)
    xc, xf = _moments(xr.astype(np.float64), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    _, xf_c = _moments(xr.astype(np.float64) * 0.5 + 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_allclose(s.full_cross[0], xf.T @ xf_c, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.ref_sum, xc.sum(1), rtol=1e-6, atol=1e-5)


def test_whole_patch_products_over_a_position_subset(monkeypatch):
    """Above FULL_POSITIONS output positions per image the whole-patch products come from a seeded subset,
    scaled to stand for every position: exactly those positions' products × (positions / subset), close to
    the products over all positions; the per-channel sums and the target's sum still use every position."""
    monkeypatch.setattr(calibration, "FULL_POSITIONS", 1000)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 80, 80)).astype(np.float32)
    x = (x + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 3  # neighbouring pixels correlated, as in images
    y = rng.standard_normal((1, 3, 80, 80)).astype(np.float32)
    s = ConvStats.empty("c", 2, (3, 3), pads=(1, 1, 1, 1), reference=True, target="y")
    s.update(x, ref=x, target=y)
    xc, xf = _moments(x.astype(np.float64), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    np.testing.assert_allclose(s.sq, np.einsum("cmk,cml->ckl", xc, xc), rtol=1e-10, atol=1e-8)  # every position
    np.testing.assert_allclose(s.target_sum, y.sum(axis=(0, 2, 3)), rtol=1e-6)
    pick, scale = calibration._position_subset((80, 80), 1000, 0)
    rows = np.ravel_multi_index(pick, (80, 80))
    assert len(rows) == 1000 and scale == 6400 / 1000
    np.testing.assert_allclose(s.full[0], scale * xf[rows].T @ xf[rows], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s.full_cross[0], s.full[0], rtol=1e-5, atol=1e-3)
    yt = y.reshape(3, -1).T.astype(np.float64)
    np.testing.assert_allclose(s.target_cross[0], scale * xf[rows].T @ yt[rows], rtol=1e-5, atol=1e-3)
    exact = np.cov(xf.T, bias=True)
    err = np.linalg.norm(s.full_cov()[0] - exact) / np.linalg.norm(exact)
    assert err < 0.15  # 1000 of 6400 positions: a sample covariance's error is about √(D/n) = 0.13
