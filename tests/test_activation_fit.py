"""Activation-aware fits: the activation a conv feeds, its slope weights, and fits to the post-activation response."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph import fit, load
from convgraph.fit.calibration import Calibration, ConvStats, patches
from convgraph.engine.calibrate import calibrate
from convgraph.engine.rewrite import rewrite
from convgraph.run.runtime import create_session, expose_tensors

C, N_OUT, S = 6, 8, 10


def _model(tail: list, out: str, inits: dict | None = None, opset: int = 17, outputs: tuple = (), seed: int = 0,
           bias: np.ndarray | None = None) -> onnx.ModelProto:
    """x (1, C, S, S) → Conv 3×3 (output "y") → ``tail`` nodes → ``out``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_OUT, C, 3, 3)).astype(np.float32) / 6
    b = rng.standard_normal(N_OUT).astype(np.float32) if bias is None else bias.astype(np.float32)
    tensors = {"W": w, "B": b, **(inits or {})}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])] + tail
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, S, S])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, N_OUT, S, S]) for t in (out, *outputs)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _n(op, ins, outs, **kw):
    return helper.make_node(op, ins, outs, **kw)


CH = np.linspace(0.5, 2.0, N_OUT).reshape(1, N_OUT, 1, 1)
BN = {"g": np.linspace(0.5, 1.5, N_OUT), "beta": np.linspace(-1, 1, N_OUT), "mu": np.linspace(-0.2, 0.2, N_OUT),
      "var": np.linspace(0.5, 2, N_OUT)}
#: name: (tail nodes, output, extra initializers, opset, kind, params)
PATTERNS = {
    "relu": ([_n("Relu", ["y"], ["z"])], "z", {}, 17, "relu", ()),
    "leakyrelu": ([_n("LeakyRelu", ["y"], ["z"], alpha=0.1)], "z", {}, 17, "leakyrelu", (0.1,)),
    "sigmoid": ([_n("Sigmoid", ["y"], ["z"])], "z", {}, 17, "sigmoid", ()),
    "hardsigmoid": ([_n("HardSigmoid", ["y"], ["z"], alpha=0.3, beta=0.4)], "z", {}, 17, "hardsigmoid", (0.3, 0.4)),
    "hardswish": ([_n("HardSwish", ["y"], ["z"])], "z", {}, 17, "xhardsigmoid", (1 / 6, 0.5)),
    "clip": ([_n("Clip", ["y", "lo", "hi"], ["z"])], "z", {"lo": -0.5, "hi": 1.0}, 17, "clip", (-0.5, 1.0)),
    "clip-attrs": ([_n("Clip", ["y"], ["z"], min=0.0, max=6.0)], "z", {}, 6, "clip", (0.0, 6.0)),
    "silu": ([_n("Sigmoid", ["y"], ["s"]), _n("Mul", ["y", "s"], ["z"])], "z", {}, 17, "silu", ()),
    "x-hardsigmoid": ([_n("HardSigmoid", ["y"], ["s"]), _n("Mul", ["s", "y"], ["z"])], "z", {}, 17, "xhardsigmoid",
                      (0.2, 0.5)),
    "paddle-hardswish": ([_n("Mul", ["y", "a"], ["t0"]), _n("Add", ["t0", "c"], ["t"]), _n("Add", ["t", "three"], ["u"]),
                          _n("Clip", ["u", "zero", "six"], ["v"]), _n("Mul", ["t", "v"], ["m"]),
                          _n("Div", ["m", "six"], ["z"])], "m",
                         {"a": CH, "c": np.full((1, N_OUT, 1, 1), 0.3), "three": 3.0, "zero": 0.0, "six": 6.0}, 17,
                         "xclip", (3.0, 0.0, 6.0)),
    "bn-relu": ([_n("BatchNormalization", ["y", "g", "beta", "mu", "var"], ["t"]), _n("Relu", ["t"], ["z"])], "z", BN,
                17, "relu", ()),
    "affine-silu": ([_n("Div", ["y", "k"], ["t0"]), _n("Sub", ["q", "t0"], ["t"]), _n("Sigmoid", ["t"], ["s"]),
                     _n("Mul", ["t", "s"], ["z"])], "z", {"k": CH, "q": 0.2}, 17, "silu", ()),
}


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, C, S, S)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_detected_activation_and_its_slope_match_onnxruntime(name):
    """Each pattern is found, and scale·σ'(t) is the derivative dz/dy that onnxruntime's ops give (central
    differences through the conv bias)."""
    tail, out, inits, opset, kind, params = PATTERNS[name]
    m = _model(tail, out, inits, opset)
    act = fit.activation_of(load(m), "conv")
    assert act is not None and act.kind == kind and act.output == out
    np.testing.assert_allclose(act.params, params, rtol=1e-6)
    x = _feeds(1, 1)[0]
    t = create_session(expose_tensors(m, [act.tensor])).run([act.tensor], x)[0]
    eps, outs = 1e-3, []
    b = numpy_helper.to_array(m.graph.initializer[1])
    for sign in (1, -1):
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(b + sign * eps, "B"))
        outs.append(create_session(m).run([out], x)[0])
    numeric = (outs[0] - outs[1]) / (2 * eps)
    analytic = act.slope(t) * act.scale.reshape(1, N_OUT, 1, 1)
    close = np.isclose(numeric, analytic, rtol=1e-2, atol=1e-2)
    assert close.mean() > 0.98, (name, np.abs(numeric - analytic).max())


@pytest.mark.parametrize("case", ["plain", "two-readers", "output", "residual", "clip-input-bound"])
def test_no_activation_where_the_conv_output_is_used_otherwise(case):
    tail = {"plain": [], "two-readers": [_n("Relu", ["y"], ["z"]), _n("Add", ["y", "z"], ["u"])],
            "output": [_n("Relu", ["y"], ["z"])], "residual": [_n("Add", ["y", "x2"], ["t"]), _n("Relu", ["t"], ["z"])],
            "clip-input-bound": [_n("ReduceMax", ["x"], ["hi"], keepdims=0), _n("Clip", ["y", "", "hi"], ["z"])]}[case]
    out = {"plain": "y", "two-readers": "u", "output": "z", "residual": "z", "clip-input-bound": "z"}[case]
    extra = ("y",) if case == "output" else ()
    m = _model(tail, out, {"x2": np.ones((1, N_OUT, S, S))} if case == "residual" else {}, outputs=extra)
    assert fit.activation_of(load(m, check=False), "conv") is None


def test_calibrated_weights_are_the_mean_squared_slope(tmp_path):
    """act_sq / count is E[(a σ'(t))²] per channel, computed here from onnxruntime's t; split halves add up;
    a saved calibration keeps them."""
    tail, out, inits, opset, *_ = PATTERNS["paddle-hardswish"]
    m = _model(tail, out, inits, opset)
    feeds = _feeds(4, 2)
    calib = calibrate(m, feeds, progress=False)
    calib.save(tmp_path / "c.npz")
    again = Calibration.load(tmp_path / "c.npz")["conv"]
    st = calib["conv"]
    assert again.activation == st.activation and again.holdout.activation == st.activation
    np.testing.assert_array_equal(again.act_sq, st.act_sq)
    np.testing.assert_array_equal(again.holdout.act_sq, st.holdout.act_sq)
    assert st.activation == "xclip(3, 0, 6)"
    t = np.concatenate([create_session(expose_tensors(m, ["t"])).run(["t"], f)[0] for f in feeds])
    u = t + 3
    slope = (np.clip(u, 0, 6) + t * ((u > 0) & (u < 6))) * CH
    want = np.mean(slope**2, axis=(0, 2, 3))
    np.testing.assert_allclose(st.act_sq / st.count, want, rtol=1e-5)
    fit_part, held = st.split()
    np.testing.assert_allclose(fit_part.act_sq + held.act_sq, st.act_sq)
    d = fit.row_weights(st)
    np.testing.assert_allclose(d, np.maximum(want / want.mean(), fit.activation.WEIGHT_FLOOR), rtol=1e-5)
    assert calibrate(m, feeds, progress=False, activations=False)["conv"].act_sq is None


def _weighted_error(x, w, w_new, b, b_new, d) -> float:
    """Σ_o d_o E[(y_o − y'_o)²] over the patches of x (brute force)."""
    p = patches(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    y = np.einsum("nchwij,ocij->nohw", p, w) + b[None, :, None, None]
    y2 = np.einsum("nchwij,ocij->nohw", p, w_new) + b_new[None, :, None, None]
    return float(np.sum(d * np.mean((y - y2) ** 2, axis=(0, 2, 3))))


def test_row_weighted_low_rank_is_the_weighted_reduced_rank_regression():
    """Channel form, whole-patch metric, no damping: W' = D^{−1/2}[D^{1/2} W Σ^{1/2}]_R Σ^{−1/2} (numpy, from
    the patches), which beats the unweighted fit in the weighted error and loses in the plain one."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, C, S, S)) @ np.eye(S) + rng.standard_normal((8, C, 1, 1))
    w, b = rng.standard_normal((N_OUT, C, 3, 3)), rng.standard_normal(N_OUT)
    d = rng.uniform(0.05, 3, N_OUT)
    st = ConvStats.empty("c", C, (3, 3), pads=(1, 1, 1, 1))
    for i in range(len(x)):
        st.update(x[i:i + 1])
    f = fit.low_rank_fit(w, b, 3, st, damp=0.0, select=False, rows=d)
    pm = patches(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)).transpose(0, 2, 3, 1, 4, 5).reshape(-1, C * 9)
    sig = np.cov(pm.T, bias=True)
    lam, q = np.linalg.eigh(sig)
    half, ihalf = (q * np.sqrt(lam)) @ q.T, (q / np.sqrt(lam)) @ q.T
    u, s, vt = np.linalg.svd(np.sqrt(d)[:, None] * w.reshape(N_OUT, -1) @ half)
    want = ((u[:, :3] * s[:3]) @ vt[:3] @ ihalf / np.sqrt(d)[:, None]).reshape(w.shape)
    # the whole-patch sums are taken in float32 chunks (convgraph.engine.calibrate): agreement to ~1e-6
    np.testing.assert_allclose(f.weight((3, 3)), want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(f.bias, b + (w - want).reshape(N_OUT, -1) @ pm.mean(0), atol=1e-5)
    plain = fit.low_rank_fit(w, b, 3, st, damp=0.0, select=False)
    wd, wp = (f.weight((3, 3)), f.bias), (plain.weight((3, 3)), plain.bias)
    assert _weighted_error(x, w, *wd[:1], b, wd[1], d) < _weighted_error(x, w, *wp[:1], b, wp[1], d)
    ones = np.ones(N_OUT)
    assert _weighted_error(x, w, *wp[:1], b, wp[1], ones) < _weighted_error(x, w, *wd[:1], b, wd[1], ones)


@pytest.mark.parametrize("rule,params", [("separable", {"rank": "1"}), ("spatial-separable", {"rank": "1"}),
                                         ("low-rank", {"rank": "2", "form": "spatial"})])
def test_row_weights_lower_the_weighted_error_of_every_factorization(rule, params):
    """The rules' fits with response=post lower Σ d_o E[(y_o − y'_o)²] on the calibration data against
    response=pre (the d of a ReLU whose channels are on at very different rates)."""
    bias = np.linspace(-2.5, 1.0, N_OUT)
    m = _model([_n("Relu", ["y"], ["z"])], "z", bias=bias, seed=4)
    feeds = _feeds(6, 5)
    stats = calibrate(m, feeds, progress=False, holdout=False)
    d = fit.row_weights(stats["conv"])
    assert d.max() / d.min() > 3
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    w = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    errs = {}
    for resp in ("pre", "post"):
        new = rewrite(m, [rule], params={**params, "response": resp}, calibration=stats, verify=False).model
        y_new = np.concatenate([create_session(expose_tensors(new, ["y"])).run(["y"], f)[0] for f in feeds])
        p = patches(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
        y = np.einsum("nchwij,ocij->nohw", p, w) + bias[None, :, None, None]
        errs[resp] = float(np.sum(d * np.mean((y - y_new) ** 2, axis=(0, 2, 3))))
    assert errs["post"] < errs["pre"], errs


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_post_activation_fit_beats_the_pre_activation_fit_on_held_out_inputs(act):
    """A conv whose channels a ReLU / SiLU turns on at very different rates, at low rank: the fit to the
    activation's response has the lower error after the activation on inputs it was not fitted on
    (onnxruntime)."""
    bias = np.linspace(-3.0, 1.0, N_OUT)
    tail = PATTERNS[act][0]
    m = _model(tail, "z", bias=bias, seed=6)
    stats = calibrate(m, _feeds(8, 7), progress=False)
    held = _feeds(6, 8)
    ref = np.concatenate([create_session(m).run(["z"], f)[0] for f in held])
    err = {}
    for resp in ("pre", "post"):
        res = rewrite(m, ["low-rank"], params={"rank": "2", "form": "channel", "response": resp}, calibration=stats,
                      verify=False)
        assert ("response" in res.report.changes[0].notes) == (resp == "post")
        got = np.concatenate([create_session(res.model).run(["z"], f)[0] for f in held])
        err[resp] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err["post"] < 0.9 * err["pre"], err
