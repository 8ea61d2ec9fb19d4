"""Conv arithmetic against onnx's shape inference, onnxruntime, and brute-force counts."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from convgraph.model import arithmetic as ar


def _single_node_model(op: str, x_shape: list[int], w: np.ndarray, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _inferred_output(model: onnx.ModelProto) -> tuple[int, ...]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return tuple(d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@st.composite
def conv_case(draw):
    nd = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 3)) for _ in range(nd)]
    auto_pad = draw(st.sampled_from(ar.AUTO_PADS))
    pads = [draw(st.integers(0, 3)) for _ in range(2 * nd)]
    sizes = [draw(st.integers(ar.effective_kernel(k, d), 12)) for k, d in zip(kernel, dilations)]
    return nd, kernel, strides, dilations, auto_pad, pads, sizes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_conv_output_matches_onnx_shape_inference(case):
    nd, kernel, strides, dilations, auto_pad, pads, sizes = case
    attrs = dict(kernel_shape=kernel, strides=strides, dilations=dilations)
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    w = np.zeros([2, 1, *kernel], np.float32)
    model = _single_node_model("Conv", [1, 1, *sizes], w, **attrs)
    got = ar.conv_output_spatial(sizes, kernel, strides, dilations, attrs.get("pads", ()), auto_pad)
    assert (1, 2, *got) == _inferred_output(model)
    resolved = ar.conv_pads(sizes, kernel, strides, dilations, attrs.get("pads", ()), auto_pad)
    # the resolved explicit pads give the same output size as auto_pad
    assert ar.conv_output_spatial(sizes, kernel, strides, dilations, resolved) == got


def test_same_pads_split_like_onnxruntime():
    # 2D, 4×4 input, 2×2 kernel, stride 1: total pad 1 per dim; SAME_UPPER puts it at the end
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    w = np.ones((1, 1, 2, 2), np.float32)
    for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = ar.conv_pads([4, 4], [2, 2], [1, 1], [1, 1], (), auto_pad)
        assert pads == ((0, 0, 1, 1) if auto_pad == "SAME_UPPER" else (1, 1, 0, 0))
        y_auto = _run(_single_node_model("Conv", [1, 1, 4, 4], w, kernel_shape=[2, 2], auto_pad=auto_pad), x)
        y_explicit = _run(_single_node_model("Conv", [1, 1, 4, 4], w, kernel_shape=[2, 2], pads=list(pads)), x)
        np.testing.assert_array_equal(y_auto, y_explicit)


def _conv_transpose_reference(x: np.ndarray, w: np.ndarray, s: int, d: int, pads: tuple, out: int):
    """1D ConvTranspose by scattering; returns (output cropped by pads / filled to ``out``, multiply count)."""
    _, c_in, i = x.shape
    _, c_out, k = w.shape
    full = s * (i - 1) + d * (k - 1) + 1
    y = np.zeros((1, c_out, max(full, pads[0] + out)), np.float64)
    mults = 0
    for p in range(i):
        for t in range(k):
            y[0, :, p * s + t * d] += x[0, :, p] @ w[:, :, t]
            mults += c_in * c_out
    return y[:, :, pads[0]:pads[0] + out], mults


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(i=st.integers(1, 7), k=st.integers(1, 4), s=st.integers(1, 3), d=st.integers(1, 2),
       mode=st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape"]),
       p=st.tuples(st.integers(0, 2), st.integers(0, 2)), extra=st.integers(-2, 0), adj=st.integers(0, 2))
def test_conv_transpose_geometry_matches_onnxruntime(i, k, s, d, mode, p, extra, adj) -> None:
    """Output size against onnx's inference; resolved pads against onnxruntime's numbers; MACs against a count."""
    rng = np.random.default_rng(0)
    c_in, c_out = 2, 3
    x = rng.standard_normal((1, c_in, i)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out, k)).astype(np.float32)
    attrs: dict = dict(kernel_shape=[k], strides=[s], dilations=[d])
    full = s * (i - 1) + d * (k - 1) + 1
    pads: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    auto_pad = "NOTSET"
    if mode == "pads":
        if p[0] + p[1] >= full + adj or adj >= s:
            return  # no output, or an output_padding onnxruntime refuses (it needs < stride)
        pads, output_padding = p, (adj,)
        attrs.update(pads=list(p), output_padding=[adj])
    elif mode == "output_shape":
        output_shape = (full + extra,)
        if output_shape[0] < 1:
            return
        attrs["output_shape"] = list(output_shape)
    else:
        auto_pad = mode
        attrs["auto_pad"] = mode
    resolved, out = ar.conv_transpose_geometry([i], [k], [s], [d], pads, auto_pad, output_padding, output_shape)
    model = _single_node_model("ConvTranspose", [1, c_in, i], w, **attrs)
    inferred = _inferred_output(model)
    if len(inferred) == 3:  # onnx leaves the spatial dims out when output_shape is below the input size
        assert (1, c_out, *out) == inferred
    y = _run(model, x)
    assert y.shape == (1, c_out, *out)
    ref, mults = _conv_transpose_reference(x, w, s, d, resolved, out[0])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert ar.conv_transpose_macs((1, c_in, i), c_out, [k]) == mults


def test_conv_macs_brute_force():
    """out_elements × C_in/g × prod(k), taps on padding included, dilation adding nothing."""
    c_in, c_out, g, k, d = 4, 6, 2, 3, 2
    out_h = out_w = ar.conv_output_spatial([9, 9], [k, k], [1, 1], [d, d], [2, 2, 2, 2])[0]
    count = sum(1 for _ in range(out_h * out_w) for _ in range(c_out) for _ in range(c_in // g) for _ in range(k * k))
    assert ar.conv_macs((1, c_out, out_h, out_w), c_in // g, (k, k)) == count == 1 * 6 * 9 * 9 * 2 * 9
    assert ar.conv_macs((1, c_out, None, out_w), c_in // g, (k, k)) is None
    assert ar.bias_adds((1, c_out, out_h, out_w)) == c_out * out_h * out_w


def test_conv_transpose_macs_db_head():
    """PP-OCR det's last ConvTranspose: 24→1, k=2, s=2, 320² → 640²: in_elements × C_out/g × k²."""
    assert ar.conv_transpose_macs((1, 24, 320, 320), 1, (2, 2)) == 24 * 320 * 320 * 4 == 9_830_400


def test_conv_params():
    assert ar.conv_params((16, 4, 3, 3), 16, has_bias=True) == 16 * 4 * 9 + 16
    assert ar.conv_params((16, 4, 3, 3), 16, has_bias=False) == 16 * 4 * 9


def test_receptive_field_dilated_chain():
    """Three 3×3 convs with dilations 1, 2, 4: 15×15 (Yu & Koltun)."""
    r, j = 1, 1
    for d in (1, 2, 4):
        r, j = ar.rf_step(r, j, 3, 1, d)
    assert (r, j) == (15, 1)


def test_receptive_field_strided_chain():
    r, j = 1, 1
    for k, s in ((7, 2), (3, 2), (3, 1)):  # ResNet stem: conv 7×7 s2, maxpool 3×3 s2, then 3×3
        r, j = ar.rf_step(r, j, k, s)
    assert (r, j) == (7 + 2 * 2 + 2 * 4, 4) == (19, 4)


def test_receptive_field_transposed_step():
    r, j = ar.rf_step(7, 4, 2, 2, transposed=True)  # k=2, s=2: each output reads one input pixel
    assert (r, j) == (7, 2)
    r, j = ar.rf_step(1, 1, 3, 2, transposed=True)  # k=3, s=2: up to two input pixels
    assert (r, j) == (2, Fraction(1, 2))


def test_numel_and_out_elements() -> None:
    assert ar.numel((1, 8, 16, 16)) == 2048 and ar.numel(()) == 1 and ar.numel((np.int64(3), 2)) == 6
    assert ar.numel(None) is None and ar.numel((1, "N", 4)) is None and ar.numel((1, None)) is None
    assert ar.out_elements((2, 8, 4, 5)) == 2 * 4 * 5  # per channel: batch × positions
    assert ar.out_elements((2, "C", 4, 5)) == 40  # the channel count is not needed
    assert ar.out_elements((2, 8, None, 5)) is None and ar.out_elements((2, 8)) is None and ar.out_elements(None) is None
    assert ar.bias_adds((2, 8, 4, 5)) == 320 and ar.bias_adds((2, "C", 4, 5)) is None
    assert ar.conv_macs((2, 8, 4, 5), 3, (3, 3)) == 320 * 27 and ar.conv_macs((2, 8, None, 5), 3, (3, 3)) is None
    assert ar.conv_transpose_macs((1, 4, 2, 2), 6, (3, 3)) == 16 * 54 and ar.conv_transpose_macs(None, 6, (3,)) is None
