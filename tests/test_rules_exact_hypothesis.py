"""Property tests of the exact rules over random geometry, against onnxruntime running the original.

Each example builds one small conv (random dims 1D–3D, kernels, strides, pads or auto_pad,
dilations, groups, bias), rewrites it and compares outputs: max abs error / max abs output ≤ 1e-4
(≤ 1e-5 for the sub-pixel ConvTranspose).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers import EXACT_TOL, assert_same, random_x, rewrite_with, single_op

#: CONVGRAPH_HYPOTHESIS_EXAMPLES=2000 for a deep run; 40 keeps the file fast.
SETTINGS = settings(max_examples=int(os.environ.get("CONVGRAPH_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _pads(draw, nd: int, eff: list[int], sizes: list[int], allow_same: bool) -> dict:
    mode = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"] if allow_same else ["NOTSET", "VALID"]))
    if mode != "NOTSET":
        return {"auto_pad": mode}
    pads = [draw(st.integers(0, e - 1)) for e in eff] + [draw(st.integers(0, e - 1)) for e in eff]
    return {"pads": pads}


@st.composite
def conv_cases(draw, min_cig: int = 1, need_taps: bool = False, need_dilation: bool = False):
    """(x shape, weight, bias, attrs) of a valid Conv; ``need_taps``: a kernel of more than one tap."""
    nd = draw(st.integers(1, 3))
    group = draw(st.integers(1, 2))
    cig, cog = draw(st.integers(min_cig, 3)), draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    if need_taps and all(k == 1 for k in kernel):
        kernel[draw(st.integers(0, nd - 1))] = draw(st.integers(2, 3))
    dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    if need_dilation and not any(d > 1 and k > 1 for d, k in zip(dil, kernel)):
        kernel[0], dil[0] = max(kernel[0], 2), draw(st.integers(2, 3))
    strides = [draw(st.integers(1, 2)) for _ in range(nd)]
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    sizes = [draw(st.integers(e, e + 3)) for e in eff]
    # onnxruntime runs SAME_* only without dilation
    attrs = {"strides": strides, "dilations": dil, "group": group, "kernel_shape": kernel,
             **_pads(draw, nd, eff, sizes, allow_same=all(d == 1 for d in dil))}
    seed = draw(st.integers(0, 2**16))
    w = random_x([group * cog, cig, *kernel], seed=seed)
    b = random_x([group * cog], seed=seed + 1) if draw(st.booleans()) else None
    x_shape = [draw(st.integers(1, 2)), group * cig, *sizes]
    return x_shape, w, b, attrs


@SETTINGS
@given(case=conv_cases(min_cig=2, need_taps=True), layout=st.sampled_from(["auto", "multiplier", "tiled"]), data=st.data())
def test_separable_full_rank_is_exact(case, layout, data):
    x_shape, w, b, attrs = case
    full = min(w.shape[0] // attrs["group"], int(np.prod(attrs["kernel_shape"])))
    rank = data.draw(st.sampled_from(["full", str(full), str(full + 2)]))  # any rank ≥ full is exact
    model = single_op("Conv", x_shape, w, b, **attrs)
    out, reps, reasons = rewrite_with(model, "separable", {"rank": rank, "layout": layout})
    assert len(reps) == 1 and reps[0].exact, reasons
    assert_same(model, out, {"x": random_x(x_shape)})


@st.composite
def conv_transpose_cases(draw):
    """(x shape, weight, bias, attrs) of a valid ConvTranspose: strides 1–3, kernels 1–5, dilations 1–2,
    pads or auto_pad or output_shape, output_padding < stride, groups 1–2, 1D–3D."""
    nd = draw(st.integers(1, 3))
    group = draw(st.integers(1, 2))
    cig, cog = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 5)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dil = [draw(st.integers(1, 2)) for _ in range(nd)]
    sizes = [draw(st.integers(1, 4)) for _ in range(nd)]
    adj = [draw(st.integers(0, s - 1)) for s in strides]
    natural = [s * (i - 1) + a + d * (k - 1) + 1 for s, i, a, d, k in zip(strides, sizes, adj, dil, kernel)]
    attrs = {"strides": strides, "dilations": dil, "group": group, "output_padding": adj}
    mode = draw(st.sampled_from(["pads", "pads", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape"]))
    if mode == "pads":
        begins = [draw(st.integers(0, n - 1)) for n in natural]
        attrs["pads"] = begins + [draw(st.integers(0, n - 1 - b)) for n, b in zip(natural, begins)]
    elif mode == "output_shape":  # onnxruntime accepts sizes up to natural − output_padding + stride − 1
        attrs["output_shape"] = [draw(st.integers(max(1, n - 3), n - a + s - 1)) for n, a, s in zip(natural, adj, strides)]
        if draw(st.booleans()):
            attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER"]))
    else:
        attrs["auto_pad"] = mode
    seed = draw(st.integers(0, 2**16))
    w = random_x([group * cig, cog, *kernel], seed=seed)
    b = random_x([group * cog], seed=seed + 1) if draw(st.booleans()) else None
    return [draw(st.integers(1, 2)), group * cig, *sizes], w, b, attrs


@SETTINGS
@given(case=conv_transpose_cases(), dynamic=st.booleans())
def test_transpose_subpixel_is_exact(case, dynamic):
    x_shape, w, b, attrs = case
    dims = x_shape if not dynamic or "output_shape" in attrs else ["N", x_shape[1], *(f"d{i}" for i in range(len(x_shape) - 2))]
    model = single_op("ConvTranspose", dims, w, b, **attrs)
    out, reps, reasons = rewrite_with(model, "transpose-subpixel")
    assert len(reps) == 1, reasons
    assert "ConvTranspose" not in [n.op_type for n in out.graph.node]
    assert_same(single_op("ConvTranspose", x_shape, w, b, **attrs), out, {"x": random_x(x_shape)}, tol=1e-5)


@SETTINGS
@given(case=conv_cases(need_dilation=True), transposed=st.booleans())
def test_dense_is_exact(case, transposed):
    x_shape, w, b, attrs = case
    attrs.pop("kernel_shape")
    if transposed:  # same geometry as a ConvTranspose: weight (C_in, C_out/g, *k)
        g = attrs["group"]
        w = random_x([x_shape[1], w.shape[0] // g, *w.shape[2:]], seed=2)
        attrs.pop("pads", None)
        attrs["auto_pad"] = attrs.get("auto_pad", "SAME_UPPER")
    model = single_op("ConvTranspose" if transposed else "Conv", x_shape, w, b, **attrs)
    out, reps, reasons = rewrite_with(model, "dense")
    assert len(reps) == 1 and reps[0].exact, reasons
    assert_same(model, out, {"x": random_x(x_shape)}, tol=EXACT_TOL)


@SETTINGS
@given(case=conv_cases(), transposed=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 999))
def test_fold_bn_is_exact(case, transposed, eps, seed):
    x_shape, w, b, attrs = case
    attrs.pop("kernel_shape")
    c_out = w.shape[0]
    if transposed:
        w = random_x([x_shape[1], c_out // attrs["group"], *w.shape[2:]], seed=seed)
        attrs.pop("pads", None)
        attrs["auto_pad"] = "VALID"
    rng = np.random.default_rng(seed)
    params = [rng.uniform(0.2, 3, c_out), rng.standard_normal(c_out), rng.standard_normal(c_out), rng.uniform(0.05, 4, c_out)]
    inits = [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, ("s", "bb", "m", "v"))]
    bn = helper.make_node("BatchNormalization", ["conv_out", "s", "bb", "m", "v"], ["y"], name="bn", epsilon=eps)
    model = single_op("ConvTranspose" if transposed else "Conv", x_shape, w, b, extra_nodes=[bn], extra_inits=inits, **attrs)
    out, reps, reasons = rewrite_with(model, "fold-bn")
    assert len(reps) == 1, reasons
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose" if transposed else "Conv"]
    assert out.graph.node[0].output[0] == "y" and out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert_same(model, out, {"x": random_x(x_shape)})
