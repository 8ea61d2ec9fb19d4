"""Tolerances by element type (and int8 requantization): the rewrite engine's exact checks and verify's defaults."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.run import tolerance
from convgraph.engine.rewrite import rewrite

from helpers import REAL, run_cli, to_float16


def test_bounds_follow_the_type():
    assert tolerance.for_type(TensorProto.FLOAT).limit == 1e-4
    assert tolerance.for_type(TensorProto.DOUBLE).limit == 1e-4
    f16 = tolerance.for_type(TensorProto.FLOAT16)
    assert f16.limit == pytest.approx(10 * 2.0 ** -10) and f16.basis.startswith("float16: 10 × its machine epsilon")
    assert tolerance.for_type(TensorProto.BFLOAT16).limit == pytest.approx(10 * 2.0 ** -7)
    assert tolerance.for_type(None).limit == 1e-4
    assert tolerance.verify_defaults([TensorProto.FLOAT]) == (None, None, None)
    atol, rtol, why = tolerance.verify_defaults([TensorProto.FLOAT, TensorProto.FLOAT16])
    assert atol == rtol == pytest.approx(10 * 2.0 ** -10) and why.startswith("float16 outputs")
    b = tolerance.requantized(0.5)
    assert b.measure == "rms" and b.limit == 1.0 and b.holds(rms=0.9) and not b.holds(rms=1.1)
    assert b.holds(scaled=0.3) is None  # not its measure
    d = tolerance.twin_bound(0.99)
    assert d.measure == "distance" and d.limit == pytest.approx(0.02) and d.holds(cosine=0.985) and not d.holds(cosine=0.97)


def conv_bn(dtype=np.float16, channels: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x → Conv 3×3 → BatchNormalization → y, in ``dtype``, with a trained-looking spread of BN scales."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = {"w": rng.standard_normal((channels, channels, 3, 3)) / 10, "b": rng.standard_normal(channels) * 0.1,
             "gamma": rng.uniform(0.1, 3, channels), "beta": rng.standard_normal(channels),
             "mean": rng.standard_normal(channels), "var": rng.uniform(0.01, 2, channels)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [1, channels, 16, 16])],
                          [helper.make_tensor_value_info("y", elem, [1, channels, 16, 16])],
                          [numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_an_exact_float16_rewrite_is_held_to_float16_rounding():
    res = rewrite(conv_bn(), ["fold-bn"])
    c = res.report.changes[0]
    assert c.exact and c.tolerance["basis"].startswith("float16") and c.output_error <= c.tolerance["limit"]
    assert "float16" in res.report.checks["model tolerance"]
    assert res.report.verification["tolerance_basis"].startswith("float16 outputs")
    assert res.report.verification["tolerance"]["atol"] == pytest.approx(10 * 2.0 ** -10)
    f32 = rewrite(conv_bn(np.float32), ["fold-bn"]).report
    assert f32.changes[0].tolerance["limit"] == 1e-4 and f32.verification["tolerance_basis"] is None


def test_a_float16_rewrite_beyond_its_rounding_is_still_refused(monkeypatch):
    from convgraph.rules import fold_bn

    real = fold_bn.scaled

    def off(*a, **k):
        w, b = real(*a, **k)
        return w * 1.05, b  # 5%: far beyond ten float16 roundings

    monkeypatch.setattr(fold_bn, "scaled", off)
    with pytest.raises(Exception, match=r"beyond max abs error / max abs output ≤ 0.00977 \(float16"):
        rewrite(conv_bn(), ["fold-bn"])


def test_verify_defaults_follow_the_output_type(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn(), a)
    onnx.save(rewrite(conv_bn(), ["fold-bn"]).model, b)
    code, out, err = run_cli(capsys, "verify", a, b, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["tolerance"]["atol"] == pytest.approx(10 * 2.0 ** -10)
    assert doc["tolerance_basis"].startswith("float16 outputs")
    code, out, err = run_cli(capsys, "verify", a, b, "--atol", "1e-6", "--rtol", "1e-6", "--json")
    assert json.loads(out)["tolerance"]["atol"] == 1e-6  # given tolerances are kept
    code, out, err = run_cli(capsys, "verify", a, b)
    assert "tolerance by type: float16 outputs" in out


@pytest.mark.real
def test_fold_bn_on_a_real_classifier_cast_to_float16(real_models):
    """PP-OCR's direction classifier (35 BatchNormalizations) in float16: refused against float32's 1e-4 before."""
    model = to_float16(onnx.load(real_models("ppocr-cls")))
    res = rewrite(model, ["fold-bn"], input_shapes=REAL["ppocr-cls"])
    changes = res.report.changes
    assert len(changes) == 35 and all(c.tolerance["basis"].startswith("float16") for c in changes)
    assert max(c.output_error for c in changes) > 1e-4  # float32's bound would have refused it
    assert all(c.output_error <= c.tolerance["limit"] for c in changes)
