"""The approximate rules: spatial-separable, dilated, transpose-resize.

Each rewrite is checked against onnxruntime running the original: exact where the weights allow it
(full rank, kernels on the dilated grid, ConvTranspose kernels a box convolved with something), and
otherwise an honest, measured error that behaves (falls with rank, beats plain sampling on images).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from helpers import (
    assert_same, drawn_conv2d, input_shape, op_types, random_x, rel_err, rewrite_with, run, single_op)

import convgraph
from convgraph.analysis.analyze import analyze
from convgraph.registry import all_rules, get_rule
from convgraph.rule import RuleContext

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def picture(name: str, h: int, w: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
    """One of scikit-image's sample photos as a (1, 3, h, w) float32 batch, normalized."""
    import skimage
    from PIL import Image

    with Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)) as im:
        a = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
    x = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def smooth(shape, seed: int = 0, passes: int = 3) -> np.ndarray:
    """Spatially correlated random input (box-blurred noise), like images and feature maps."""
    x = np.random.default_rng(seed).standard_normal(shape)
    for _ in range(passes):
        for ax in range(2, len(shape)):
            x = (np.roll(x, 1, ax) + x + np.roll(x, -1, ax)) / 3
    return x.astype(np.float32)


def record(model, name: str, input_shapes=None):
    """(ConvGraph, record) of the conv called ``name``."""
    cg = convgraph.load(model, input_shapes)
    return cg, next(r for r in analyze(cg, rewrites=False).convs if (r.name or r.node_id) == name)


def test_rules_are_registered_with_their_contract():
    rules = all_rules()
    for name in ("spatial-separable", "dilated", "transpose-resize"):
        assert rules[name].summary and rules[name].estimate is not None and not rules[name].prepass
    sp = rules["spatial-separable"]
    assert sp.resolve_params({}) == {"rank": 1, "fit": "data", "response": "pre"}
    assert sp.is_exact(sp.resolve_params({"rank": "full"})) and not sp.is_exact(sp.resolve_params({"rank": "3"}))
    assert not rules["dilated"].is_exact({}) and not rules["transpose-resize"].is_exact({})
    assert rules["dilated"].resolve_params({}) == {"kernel": "auto", "dilation": "auto", "correlation": 0.9, "fit": "data"}
    assert rules["transpose-resize"].resolve_params({"mode": "linear"})["mode"] == "linear"
    for rule, bad in (("dilated", {"correlation": "1"}), ("dilated", {"kernel": "0"}),
                      ("transpose-resize", {"mode": "cubic"}), ("spatial-separable", {"rank": "0"})):
        with pytest.raises(convgraph.UsageError, match=rule):
            rules[rule].resolve_params(bad)


# ---- spatial-separable ---------------------------------------------------------------------------
@given(data=st.data())
@HYPOTHESIS
def test_spatial_separable_full_rank_is_exact(data):
    model = drawn_conv2d(data, 1)
    out, (rep,), _ = rewrite_with(model, "spatial-separable", {"rank": "full"})
    assert rep.exact and rep.weight_error <= 1e-6
    assert op_types(out) == ["Conv", "Conv"]
    assert_same(model, out, {"x": random_x(input_shape(model))})


def test_spatial_separable_error_falls_with_rank():
    w = random_x([6, 4, 4, 4], seed=1)
    model = single_op("Conv", [4, 4, 12, 12], w, pads=[1, 2, 2, 1], strides=[2, 1])
    x = {"x": random_x([4, 4, 12, 12])}  # white noise: the output error follows the weight error
    (ref,) = run(model, x)
    weight_errors, output_errors = [], []
    for rank in ("1", "2", "3", "4", "full"):
        out, (rep,), _ = rewrite_with(model, "spatial-separable", {"rank": rank})
        weight_errors.append(rep.weight_error)
        output_errors.append(np.linalg.norm(run(out, x)[0] - ref) / np.linalg.norm(ref))
        assert rep.exact == (rank in ("4", "full"))
    assert weight_errors[0] > weight_errors[1] > weight_errors[2] > weight_errors[3] == weight_errors[4] == 0.0
    assert output_errors[0] > output_errors[1] > output_errors[2] > 1e-3 > 1e-5 > output_errors[3]


@pytest.mark.parametrize("group", [1, 2])
def test_spatial_separable_factors_are_the_per_channel_svd(group):
    """Rank r keeps, per input channel c, the best rank-r approximation of M_c[(o, x), y] = W[o, c, y, x]
    over the outputs o of c's group."""
    w = random_x([6, 3, 3, 4], seed=2)
    attrs = dict(pads=[1, 1, 1, 2], strides=[1, 2], group=group)
    model = single_op("Conv", [1, 3 * group, 8, 9], w, **attrs)
    out, (rep,), _ = rewrite_with(model, "spatial-separable", {"rank": "2"})
    best = np.zeros_like(w, dtype=np.float64)
    og = 6 // group
    for gi in range(group):
        for c in range(3):
            m = w[gi * og:(gi + 1) * og, c].transpose(0, 2, 1).reshape(og * 4, 3).astype(np.float64)
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            best[gi * og:(gi + 1) * og, c] = ((u[:, :2] * s[:2]) @ vt[:2]).reshape(og, 4, 3).transpose(0, 2, 1)
    assert rep.weight_error == pytest.approx(np.linalg.norm(w - best) / np.linalg.norm(w), rel=1e-6)
    reference = single_op("Conv", [1, 3 * group, 8, 9], best.astype(np.float32), **attrs)
    assert_same(reference, out, {"x": random_x([1, 3 * group, 8, 9])})


SOBEL_X = np.outer([1, 2, 1], [-1, 0, 1]).astype(np.float32)


@pytest.mark.parametrize("case", ["depthwise", "one output", "x and y"])
def test_spatial_separable_is_exact_for_rank_one_kernels(case):
    if case == "depthwise":  # Sobel on each channel, scaled per channel
        w, group = (SOBEL_X * np.arange(1, 4)[:, None, None])[:, None].astype(np.float32), 3
    elif case == "one output":  # sum of per-channel Sobels: each channel's filters share [1, 2, 1]
        w, group = np.stack([SOBEL_X * c for c in (1, -2, 0.5)])[None].astype(np.float32), 1
    else:  # Sobel x and y from one channel: the vertical profiles differ, rank 2 per channel
        w, group = np.stack([SOBEL_X, SOBEL_X.T])[:, None], 1
    model = single_op("Conv", [1, w.shape[1] * group, 10, 10], w, pads=[1, 1, 1, 1], group=group)
    x = {"x": random_x([1, w.shape[1] * group, 10, 10])}
    out, (rep,), _ = rewrite_with(model, "spatial-separable", {"rank": "1"})
    assert rep.exact == (case != "x and y")
    if rep.exact:
        assert_same(model, out, x)
    else:
        assert rep.weight_error > 0.1
    full, (rep_full,), _ = rewrite_with(model, "spatial-separable", {"rank": "full"})
    assert rep_full.exact and f"rank {1 if case != 'x and y' else 2} of 3" in rep_full.notes  # trimmed
    assert_same(model, full, x)


def test_spatial_separable_structure_and_estimate(models_dir):
    cg, rec = record(models_dir / "standard.onnx", "conv5x5_s2")  # 5×5, stride 2, SAME_UPPER
    rule = get_rule("spatial-separable")
    ctx = RuleContext(cg, {rec.node_id: rec})
    assert rule.match(rec, ctx) is None
    params = rule.resolve_params({"rank": "2"})
    rep = rule.build(rec, ctx, params)
    v, h = rep.nodes
    assert (v.name, h.name) == ("conv5x5_s2/v", "conv5x5_s2/h") and list(h.output) == [rec.output]
    av = {a.name: helper.get_attribute_value(a) for a in v.attribute}
    ah = {a.name: helper.get_attribute_value(a) for a in h.attribute}
    assert av["kernel_shape"] == [5, 1] and av["strides"] == [2, 1] and av["group"] == rec.in_channels
    assert ah["kernel_shape"] == [1, 5] and ah["strides"] == [1, 2] and av["auto_pad"] == ah["auto_pad"] == b"SAME_UPPER"
    assert [t.name for t in rep.initializers] == ["conv5x5_s2/v_W", "conv5x5_s2/h_W"]
    assert list(h.input)[2] == rec.bias  # the bias is carried over as it is
    assert rep.macs_after < rec.macs and rep.kind_after == "depthwise+standard"
    cg.replace([rec.node_id], rep.nodes, rep.initializers)
    after = {r.name: r for r in analyze(convgraph.load(cg.to_model()), rewrites=False).convs}
    new = [after["conv5x5_s2/v"], after["conv5x5_s2/h"]]
    assert rep.macs_after == sum(r.macs for r in new) and rep.params_after == sum(r.params for r in new)


def test_spatial_separable_refuses_with_reasons(models_dir):
    expected = {
        "pointwise": {"conv1x1": "1×1 kernel"},
        "spatial_separable": {"conv3x1": "one-dimensional"},
        "conv1d": {"conv_k3": "1D conv"},
        "conv3d": {"conv3x3x3": "3D conv"},
        "transposed": {"up_k2s2": "not Conv"},
        "quantized": {"qconv": "quantized", "convint": "quantized"},
    }
    for name, want in expected.items():
        _, reps, reasons = rewrite_with(models_dir / f"{name}.onnx", "spatial-separable")
        for conv, why in want.items():
            key = next(k for k in reasons if k.startswith(conv))
            assert why in reasons[key], (name, key, reasons[key])


def test_spatial_separable_fits_calibration_data():
    """With calibration statistics the factors minimize the error on the layer's real inputs."""
    from convgraph.engine.calibrate import calibrate

    w = random_x([8, 4, 3, 3], seed=3)
    model = single_op("Conv", [1, 4, 16, 16], w, pads=[1, 1, 1, 1])
    feeds = [{"x": smooth([1, 4, 16, 16], seed=s)} for s in range(3)]
    cal = calibrate(model, feeds)
    cg, rec = record(model, "conv")
    rule = get_rule("spatial-separable")
    params = rule.resolve_params({"rank": "1"})
    errors = {}
    for how, ctx in (("weights", RuleContext(cg, {})), ("data", RuleContext(cg, {}, cal))):
        rep = rule.build(rec, ctx, params)
        g = convgraph.load(model)
        g.replace([rec.node_id], rep.nodes, rep.initializers)
        test = {"x": smooth([1, 4, 16, 16], seed=7)}  # not among the calibration inputs
        errors[how] = np.linalg.norm(run(model, test)[0] - run(g.to_model(), test)[0])
        assert ("calibration" in rep.notes) == (how == "data")
    assert errors["data"] < 0.7 * errors["weights"]


@pytest.mark.real
def test_spatial_separable_on_yolov8n(real_models):
    path = real_models("yolov8n")
    shapes = {"images": [1, 3, 320, 320]}
    x = {"images": picture("astronaut.png", 320, 320)}
    (ref,) = run(path, x)
    cosines = {}
    for rank in ("1", "2", "full"):
        out, reps, _ = rewrite_with(path, "spatial-separable", {"rank": rank}, input_shapes=shapes)
        assert len(reps) == 39  # every 3×3 conv
        errors = [r.weight_error for r in reps]
        if rank == "full":
            assert all(r.exact for r in reps) and max(errors) <= 1e-6
            assert_same(path, out, x)
        else:
            assert not any(r.exact for r in reps) and 0.1 < np.mean(errors) < 1  # trained 3×3s are far from rank 1
        cosines[rank] = cosine(ref, run(out, x)[0])
    assert 0.9 < cosines["1"] < cosines["2"] < cosines["full"]


# ---- dilated -------------------------------------------------------------------------------------
def _on_grid(rec, params: dict, rng) -> np.ndarray:
    """A random kernel for ``rec`` that is zero off the dilated grid the rule will use."""
    from convgraph.rules.dilated import grid

    g = grid(rec, get_rule("dilated").resolve_params(params))
    w = np.zeros((rec.out_channels, rec.in_channels // rec.group, int(np.prod(rec.kernel))), np.float32)
    w[:, :, g.taps(rec.kernel)] = rng.standard_normal((*w.shape[:2], int(np.prod(g.kernel))))
    return w.reshape(rec.out_channels, rec.in_channels // rec.group, *rec.kernel)


@given(data=st.data())
@HYPOTHESIS
def test_dilated_is_exact_for_kernels_on_the_grid(data):
    nd = data.draw(st.integers(1, 2), "spatial dims")
    new_k, dil = data.draw(st.integers(2, 3), "k'"), data.draw(st.integers(1, 3), "d")
    slack = data.draw(st.integers(0, 2), "slack")
    k = dil * (new_k - 1) + 1 + slack
    if k == new_k:  # dilation 1 and no slack: nothing would shrink
        k, slack = k + 1, slack + 1
    g = data.draw(st.integers(1, 2), "group")
    cig, cog = data.draw(st.integers(1, 2), "C_in/g"), data.draw(st.integers(1, 3), "C_out/g")
    pads = [data.draw(st.integers(0, k - 1), "pad") for _ in range(2 * nd)]
    for i in range(nd):  # enough pad for the slack around the grid
        pads[i + nd] = max(pads[i + nd], slack - pads[i])
    attrs = dict(kernel_shape=[k] * nd, pads=pads, group=g,
                 strides=data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd), "strides"))
    shape = [1, cig * g] + [k + 4] * nd
    rng = np.random.default_rng(data.draw(st.integers(0, 99), "seed"))
    probe = single_op("Conv", shape, np.zeros((cog * g, cig, *[k] * nd), np.float32), **attrs)
    params = {"kernel": str(new_k), "dilation": str(dil)}
    _, rec = record(probe, "conv")
    w = _on_grid(rec, params, rng)
    model = single_op("Conv", shape, w, rng.standard_normal(cog * g).astype(np.float32), **attrs)
    out, (rep,), _ = rewrite_with(model, "dilated", params)
    assert rep.exact and rep.weight_error <= 1e-6
    node = out.graph.node[0]
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    assert a["kernel_shape"] == [new_k] * nd and a["dilations"] == [dil] * nd
    assert_same(model, out, {"x": random_x(input_shape(model))})


def test_dilated_default_grid_centres_and_keeps_alignment(models_dir):
    out, reps, reasons = rewrite_with(models_dir / "standard.onnx", "dilated")
    assert "nothing to shrink" in reasons["conv3x3"]
    nodes = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in out.graph.node}
    five, seven = nodes["conv5x5_s2/dilated"], nodes["conv7x7/dilated"]
    assert five["kernel_shape"] == [3, 3] and five["dilations"] == [2, 2] and five["strides"] == [2, 2]
    assert five["pads"] == [1, 1, 2, 2] and "auto_pad" not in five  # SAME_UPPER resolved: onnxruntime needs that
    assert seven["kernel_shape"] == [3, 3] and seven["dilations"] == [3, 3] and seven["pads"] == [3, 3, 3, 3]
    # 7×7 → 3×3 dilation 2 spans 5 taps: the grid sits on taps 1, 3, 5 (centred), pads 3 → 2
    cg, rec = record(models_dir / "standard.onnx", "conv7x7")
    rule = get_rule("dilated")
    rep = rule.build(rec, RuleContext(cg, {}), rule.resolve_params({"kernel": "3", "dilation": "2"}))
    a = {x.name: helper.get_attribute_value(x) for x in rep.nodes[0].attribute}
    assert a["pads"] == [2, 2, 2, 2] and a["dilations"] == [2, 2]
    assert rule.estimate(rec, rule.resolve_params({})) == (rec.macs * 9 // 49, (rec.params - 8) * 9 // 49 + 8, "standard")


def test_dilated_refuses_with_reasons(models_dir):
    _, _, reasons = rewrite_with(models_dir / "dilated.onnx", "dilated")
    assert "already dilated" in reasons["conv_d2"] and "nothing to shrink" in reasons["conv_d1"]
    _, _, reasons = rewrite_with(models_dir / "quantized.onnx", "dilated")
    assert all("quantized" in why for why in reasons.values())
    # the params decide what matches: kernel=2 shrinks a 3×3 to 2×2 dilation 2
    cg, rec = record(models_dir / "standard.onnx", "conv3x3")
    rule = get_rule("dilated")
    assert rule.match(rec, RuleContext(cg, {}, params={"kernel": "2"})) is None
    assert "at most 2" in rule.match(rec, RuleContext(cg, {}, params={"dilation": "3"}))
    # a grid smaller than the window needs pads to absorb the rest
    w = random_x([2, 2, 6, 6])
    assert "pads" in rewrite_with(single_op("Conv", [1, 2, 9, 9], w), "dilated")[2]["conv"]
    dynamic = single_op("Conv", [1, 2, "H", "W"], random_x([2, 2, 5, 5]), auto_pad="SAME_UPPER")
    assert "--input-shape" in rewrite_with(dynamic, "dilated")[2]["conv"]


def test_dilated_least_squares_beats_sampling_on_smooth_inputs():
    """A blur moved onto a coarser grid: sampling drops most of its weight, the prior fit keeps it."""
    gauss = np.exp(-0.5 * (np.arange(-2, 3) / 1.2) ** 2)
    w = np.stack([np.outer(gauss, gauss), np.outer(gauss, np.gradient(gauss))])[:, None].astype(np.float32)
    model = single_op("Conv", [1, 1, 24, 24], w, pads=[2, 2, 2, 2])
    x = {"x": smooth([1, 1, 24, 24], seed=5)}
    (ref,) = run(model, x)
    errors, weight_errors = {}, {}
    for rho in ("0", "0.9"):
        out, (rep,), _ = rewrite_with(model, "dilated", {"correlation": rho})
        errors[rho] = np.linalg.norm(run(out, x)[0] - ref) / np.linalg.norm(ref)
        weight_errors[rho] = rep.weight_error
        assert not rep.exact and f"correlation {float(rho)}" in rep.notes
    assert weight_errors["0"] < weight_errors["0.9"]  # sampling is the best fit of the weights...
    assert errors["0.9"] < 0.5 * errors["0"]  # ...and much the worse one of the outputs


def test_dilated_fits_calibration_data():
    from convgraph.engine.calibrate import calibrate

    w = random_x([4, 3, 5, 5], seed=8)
    model = single_op("Conv", [1, 3, 16, 16], w, random_x([4], seed=9), pads=[2, 2, 2, 2])
    cal = calibrate(model, [{"x": smooth([1, 3, 16, 16], seed=s, passes=1)} for s in range(3)])
    cg, rec = record(model, "conv")
    rule = get_rule("dilated")
    params = rule.resolve_params({})
    test = {"x": smooth([1, 3, 16, 16], seed=11, passes=1)}
    errors = {}
    for how, ctx in (("prior", RuleContext(cg, {})), ("data", RuleContext(cg, {}, cal))):
        rep = rule.build(rec, ctx, params)
        g = convgraph.load(model)
        g.replace([rec.node_id], rep.nodes, rep.initializers)
        errors[how] = np.linalg.norm(run(model, test)[0] - run(g.to_model(), test)[0])
    assert errors["data"] < errors["prior"]


@pytest.mark.real
def test_dilated_on_ppocr_det(real_models):
    path = real_models("ppocr-det")
    shapes = {"x": [1, 3, 320, 480]}
    x = {"x": picture("page.png", 320, 480, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    (ref,) = run(path, x)
    cosines = {}
    for rho in ("0", "0.9"):
        out, reps, _ = rewrite_with(path, "dilated", {"correlation": rho}, input_shapes=shapes)
        assert len(reps) == 8 and all(not r.exact and 0.2 < r.weight_error < 2 for r in reps)  # the 5×5 depthwise convs
        assert all(r.kind_after == "depthwise" and "3×3 dilation 2,2" in r.notes for r in reps)
        cosines[rho] = cosine(ref, run(out, x)[0])
    assert cosines["0.9"] > 0.8 and cosines["0"] < 0.5  # sampling wrecks the detector, the fit does not


# ---- transpose-resize ----------------------------------------------------------------------------
def _box_kernel(rng, c_in: int, og: int, kv: list[int], s: list[int]) -> np.ndarray:
    """ConvTranspose weights whose kernels are an s-tap box convolved with a random kernel: what nearest
    resize + conv computes exactly."""
    w = rng.standard_normal((c_in, og, *kv))
    for ax, sa in enumerate(s):
        w = np.apply_along_axis(np.convolve, 2 + ax, w, np.ones(sa))
    return w.astype(np.float32)


@given(data=st.data())
@HYPOTHESIS
def test_transpose_resize_nearest_is_exact_for_box_kernels(data):
    nd = data.draw(st.integers(1, 2), "spatial dims")
    s = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd), "strides")
    kv = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd), "kernel of v")
    k = [a + b - 1 for a, b in zip(kv, s)]
    g = data.draw(st.integers(1, 2), "group")
    cig, og = data.draw(st.integers(1, 2), "C_in/g"), data.draw(st.integers(1, 2), "C_out/g")
    pads = [data.draw(st.integers(0, k[i % nd] - 1), "pad") for i in range(2 * nd)]
    out_pad = [data.draw(st.integers(0, sa - 1), "output_padding") for sa in s]
    rng = np.random.default_rng(data.draw(st.integers(0, 99), "seed"))
    w = _box_kernel(rng, cig * g, og, kv, s)
    shape = [1, cig * g] + [4] * nd
    model = single_op("ConvTranspose", shape, w, rng.standard_normal(og * g).astype(np.float32), strides=s,
                      pads=pads, output_padding=out_pad, group=g, kernel_shape=k)
    out, (rep,), _ = rewrite_with(model, "transpose-resize")
    assert rep.exact and rep.weight_error <= 1e-6
    assert ("Resize" in op_types(out)) == any(sa > 1 for sa in s)
    assert_same(model, out, {"x": random_x(input_shape(model))})


@given(data=st.data())
@HYPOTHESIS
def test_transpose_resize_keeps_the_output_shape(data):
    nd = data.draw(st.integers(1, 2), "spatial dims")
    s = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd), "strides")
    k = data.draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd), "kernel")
    d = data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd), "dilations")
    begins = [data.draw(st.integers(0, da * (ka - 1)), "pad") for ka, da in zip(k, d)]
    ends = [data.draw(st.integers(0, da * (ka - 1) - b), "pad") for ka, da, b in zip(k, d, begins)]
    pads = begins + ends
    out_pad = [data.draw(st.integers(0, sa - 1), "output_padding") for sa in s]  # onnxruntime: < stride
    g = data.draw(st.integers(1, 2), "group")
    params = {"mode": data.draw(st.sampled_from(["nearest", "linear"]), "mode"),
              "kernel": data.draw(st.sampled_from(["auto", "1", "3"]), "conv kernel")}
    shape = [1, 2 * g] + [5] * nd
    w = random_x([2 * g, 2, *k], seed=data.draw(st.integers(0, 99), "seed"))
    model = single_op("ConvTranspose", shape, w, strides=s, pads=pads, output_padding=out_pad, dilations=d, group=g)
    out, (rep,), _ = rewrite_with(model, "transpose-resize", params)
    x = {"x": random_x(shape)}
    (ref,), (got,) = run(model, x), run(out, x)
    assert got.shape == ref.shape
    assert 0 <= rep.weight_error and (rep.exact or rep.weight_error > 1e-6)
    if rep.exact:
        assert rel_err(ref, got) <= 1e-4


@pytest.mark.parametrize("attrs", [
    dict(output_shape=[13, 12]),  # pads derived from the output shape
    dict(auto_pad="SAME_UPPER"),
    dict(auto_pad="SAME_LOWER"),
    dict(pads=[3, 0, 2, 1], output_padding=[1, 0]),  # pads beyond what the Conv can pad: cropped by a Slice
])
def test_transpose_resize_resolves_the_conv_transpose_geometry(attrs):
    w = _box_kernel(np.random.default_rng(17), 2, 3, [2, 2], [2, 2])  # 3×3 kernels, stride 2
    model = single_op("ConvTranspose", [1, 2, 6, 6], w, strides=[2, 2], **attrs)
    out, (rep,), _ = rewrite_with(model, "transpose-resize")
    assert rep.exact and ("Slice" in op_types(out)) == ("pads" in attrs)
    assert_same(model, out, {"x": random_x([1, 2, 6, 6])})


@pytest.mark.parametrize("rule, op, w_shape, attrs", [
    ("spatial-separable", "Conv", [6, 4, 3, 3], dict(pads=[1, 1, 1, 1])),
    ("dilated", "Conv", [6, 4, 5, 5], dict(pads=[2, 2, 2, 2])),
    ("transpose-resize", "ConvTranspose", [4, 6, 2, 2], dict(strides=[2, 2])),
])
def test_approximate_rules_keep_float16(rule, op, w_shape, attrs):
    w = random_x(w_shape, seed=18).astype(np.float16)
    model = single_op(op, [1, 4, 8, 8], w, random_x([6], seed=19).astype(np.float16), elem=TensorProto.FLOAT16, **attrs)
    out, (rep,), _ = rewrite_with(model, rule, {"rank": "full"} if rule == "spatial-separable" else {})
    assert {t.data_type for t in out.graph.initializer if t.name.endswith("_W")} == {TensorProto.FLOAT16}
    x = {"x": random_x([1, 4, 8, 8], seed=20, dtype=np.float16)}
    (y0,), (y1,) = run(model, x), run(out, x)
    assert y1.dtype == np.float16 and y1.shape == y0.shape
    if rep.exact:
        assert rel_err(y0, y1) < 5e-3


def test_transpose_resize_structure_opset_12_and_estimate():
    w = random_x([4, 3, 4, 4], seed=12)
    model = single_op("ConvTranspose", [1, 4, 6, 6], w, random_x([3], seed=13), strides=[2, 2], pads=[1, 1, 1, 1],
                      opset=12)
    cg, rec = record(model, "conv")
    rule = get_rule("transpose-resize")
    ctx = RuleContext(cg, {rec.node_id: rec})
    assert rule.match(rec, ctx) is None
    params = rule.resolve_params({})
    rep = rule.build(rec, ctx, params)
    resize, conv = rep.nodes
    assert (resize.name, conv.name) == ("conv/resize", "conv/conv") and list(conv.output) == ["y"]
    ar = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    ac = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert ar["mode"] == b"nearest" and ar["coordinate_transformation_mode"] == b"asymmetric"
    assert resize.input[1] == "conv/roi"  # roi is a required input before opset 13
    assert ac["kernel_shape"] == [3, 3] and ac["pads"] == [1, 1, 1, 1]  # k=4, s=2, p=1: the classic 3×3 pad 1
    assert rep.kind_after == "resize+standard" and not rep.exact and 0 < rep.weight_error < 1
    cg.replace([rec.node_id], rep.nodes, rep.initializers)
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    after = analyze(convgraph.load(out), rewrites=False).convs
    assert [(r.macs, r.params) for r in after] == [(rep.macs_after, rep.params_after)]
    x = {"x": random_x([1, 4, 6, 6])}
    assert run(out, x)[0].shape == run(model, x)[0].shape == (1, 3, 12, 12)


def test_transpose_resize_linear_and_larger_kernels_fit_better():
    """On a smooth upsampling kernel (bilinear-like, the kind trained decoders learn)."""
    tri = np.array([0.25, 0.75, 0.75, 0.25])
    base = np.outer(tri, tri)
    w = (base[None, None] * random_x([3, 2, 1, 1], seed=14) + 0.05 * random_x([3, 2, 4, 4], seed=15)).astype(np.float32)
    model = single_op("ConvTranspose", [1, 3, 8, 8], w, strides=[2, 2], pads=[1, 1, 1, 1])
    x = {"x": smooth([1, 3, 8, 8], seed=16)}
    (ref,) = run(model, x)
    inner = (Ellipsis, slice(2, -2), slice(2, -2))  # linear resize clamps at the borders: compare inside
    errors = {}
    for mode, kernel in (("nearest", "1"), ("nearest", "auto"), ("linear", "1"), ("linear", "3")):
        out, (rep,), _ = rewrite_with(model, "transpose-resize", {"mode": mode, "kernel": kernel})
        got = run(out, x)[0]
        errors[mode, kernel] = np.linalg.norm(got[inner] - ref[inner]) / np.linalg.norm(ref[inner])
        assert not rep.exact and f"{mode} resize" in rep.notes
    assert errors["nearest", "auto"] < errors["nearest", "1"]
    assert errors["linear", "1"] < 0.1 < errors["nearest", "1"]  # bilinear + 1×1 is (almost) the kernel itself
    assert errors["linear", "3"] < 0.1


def test_transpose_resize_refuses_with_reasons(models_dir):
    _, _, reasons = rewrite_with(models_dir / "standard.onnx", "transpose-resize")
    assert all("not ConvTranspose" in why for why in reasons.values())
    old = single_op("ConvTranspose", [1, 2, 4, 4], random_x([2, 2, 2, 2]), strides=[2, 2], opset=10)
    assert "opset 10" in rewrite_with(old, "transpose-resize")[2]["conv"]
    dynamic = single_op("ConvTranspose", [1, 2, "H", "W"], random_x([2, 2, 3, 3]), strides=[2, 2],
                        output_shape=[9, 9])
    assert "--input-shape" in rewrite_with(dynamic, "transpose-resize")[2]["conv"]


@pytest.mark.real
def test_transpose_resize_on_ppocr_det(real_models):
    path = real_models("ppocr-det")
    shapes = {"x": [1, 3, 320, 480]}
    x = {"x": picture("page.png", 320, 480, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    (ref,) = run(path, x)
    cosines = {}
    for mode in ("nearest", "linear"):
        out, reps, _ = rewrite_with(path, "transpose-resize", {"mode": mode}, input_shapes=shapes)
        assert len(reps) == 2 and all(not r.exact and 0 < r.weight_error < 1 for r in reps)
        assert op_types(out).count("Resize") == op_types(onnx.load(str(path))).count("Resize") + 2
        got = run(out, x)[0]
        assert got.shape == ref.shape
        cosines[mode] = cosine(ref, got)
    assert cosines["linear"] > cosines["nearest"] > 0.85


def test_approximate_rules_through_the_engine(models_dir):
    from convgraph.engine.rewrite import rewrite

    result = rewrite(models_dir / "sample.onnx", ["spatial-separable", "dilated", "transpose-resize"],
                     params={"rank": "2"}, verify=False)
    rules = {c.rule for c in result.report.changes}
    assert rules == {"spatial-separable", "dilated", "transpose-resize"}
    assert all(not c.exact and c.weight_error is not None and c.weight_error > 0 for c in result.report.changes)
    onnx.checker.check_model(result.model, full_check=True)
    x = {"x": random_x([1, 3, 64, 64])}
    assert run(result.model, x)[0].shape == run(models_dir / "sample.onnx", x)[0].shape
