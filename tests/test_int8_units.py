"""int8 units and the joins between them: a conv quantized with the activation after it (SiLU's Sigmoid and Mul,
a Relu folded into its range), and the data-movement ops between int8 units quantized with them, so that
onnxruntime runs the whole run on int8 (QLinearConv, QLinearSigmoid, QLinearMul, QLinearConcat)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.engine.quantize import calibrate_ranges, joins_between, quantize_model, through_clips
from convgraph.engine.rewrite import rewrite

from helpers import smooth_feeds

pytest.importorskip("onnxruntime")


def _conv(rng, name: str, x: str, out: str, ci: int, co: int, inits: list) -> onnx.NodeProto:
    w = (rng.standard_normal((co, ci, 3, 3)) / np.sqrt(9 * ci)).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array((rng.standard_normal(co) * 0.1)
                                                                                .astype(np.float32), f"{name}_b")]
    return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1])


def _silu(name: str, x: str, out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Sigmoid", [x], [f"{name}_s"], name=f"{name}_sig"),
            helper.make_node("Mul", [x, f"{name}_s"], [out], name=f"{name}_mul")]


def c2f(seed: int = 0) -> onnx.ModelProto:
    """YOLOv8's pattern in small: conv+SiLU → Split → conv+SiLU on one half → Concat with both halves →
    conv+SiLU → MaxPool → y."""
    rng = np.random.default_rng(seed)
    inits: list = [numpy_helper.from_array(np.array([4, 4], np.int64), "halves")]
    nodes = [_conv(rng, "a", "x", "a_c", 3, 8, inits), *_silu("a", "a_c", "a_y"),
             helper.make_node("Split", ["a_y", "halves"], ["h0", "h1"], name="split", axis=1),
             _conv(rng, "b", "h1", "b_c", 4, 4, inits), *_silu("b", "b_c", "b_y"),
             helper.make_node("Concat", ["h0", "h1", "b_y"], ["cat"], name="cat", axis=1),
             _conv(rng, "c", "cat", "c_c", 12, 8, inits), *_silu("c", "c_c", "c_y"),
             helper.make_node("MaxPool", ["c_y"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def feeds(n: int = 6, seed: int = 1) -> list[dict]:
    return smooth_feeds(n, seed, (1, 3, 32, 32))


def optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


def test_the_rule_quantizes_a_conv_with_its_silu(tmp_path):
    res = rewrite(c2f(), ["int8"], calib=feeds(), inputs=feeds(2, seed=9))
    ch = {c.node: c for c in res.report.changes}
    assert set(ch) == {"a", "b", "c"} and all(c.old_nodes == [n, f"{n}_sig", f"{n}_mul"] for n, c in ch.items())
    assert all(c.notes.endswith("its Sigmoid+Mul in int8 too") and c.output_cosine > 0.99 for c in ch.values())
    ops = optimized_ops(res.model, tmp_path)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearSigmoid") == 3 and ops.count("QLinearMul") == 3
    assert "Sigmoid" not in ops and "Mul" not in ops


def test_a_conv_read_by_more_than_its_activation_is_quantized_alone():
    m = c2f()
    m.graph.output.append(helper.make_tensor_value_info("b_c", TensorProto.FLOAT, [1, 4, 32, 32]))  # b's raw output is read
    res = rewrite(m, ["int8"], calib=feeds(), verify=False)
    ch = {c.node: c for c in res.report.changes}
    assert ch["b"].old_nodes == ["b"] and ch["a"].old_nodes == ["a", "a_sig", "a_mul"]


def test_joins_are_the_ops_wholly_between_units():
    m = c2f()
    units = ["a", "a_sig", "a_mul", "b", "b_sig", "b_mul", "c", "c_sig", "c_mul"]
    # MaxPool makes the graph output: it stays float; Split and Concat sit between units
    assert joins_between(m, units) == ["cat", "split"]
    # without b (float), h1 is read by a float conv: Split must dequantize it; Concat reads b's float output
    assert joins_between(m, [u for u in units if not u.startswith("b")]) == []
    assert joins_between(m, []) == []


def test_joins_between_is_linear_on_a_long_chain():
    """A chain of 20,000 Identity ops between two units: all of them join, found in one pass (a quadratic
    search would take minutes)."""
    import time

    n = 20_000
    nodes = [helper.make_node("Relu", ["x"], ["t0"], name="u0")]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=f"i{i}") for i in range(n)]
    nodes.append(helper.make_node("Relu", [f"t{n}"], ["y"], name="u1"))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    m = helper.make_model(g)
    t = time.process_time()
    assert len(joins_between(m, ["u0", "u1"])) == n
    assert time.process_time() - t < 5
    # one float reader in the middle (a graph output) and the value must be float there: the ops before it would
    # make it from int8 values, the ops after it would read it float — the whole chain stays float
    m.graph.output.append(helper.make_tensor_value_info(f"t{n // 2}", TensorProto.FLOAT, [4]))
    assert joins_between(m, ["u0", "u1"]) == []


def test_relu_and_clip_take_their_inputs_range_clipped():
    relu = helper.make_node("Relu", ["c"], ["r"])
    clip = helper.make_node("Clip", ["c", "lo", "hi"], ["k"])
    values = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    got = through_clips([relu, clip], {"c": (-3.0, 9.0), "r": (0.0, 0.1)}, values.get)
    assert got["r"] == (0.0, 9.0) and got["k"] == (0.0, 6.0)
    moving = helper.make_node("Clip", ["c", "", "bound"], ["m"])  # a max that is not a constant: left alone
    assert "m" not in through_clips([moving], {"c": (-3.0, 9.0)}, values.get)


def test_quantize_model_runs_the_units_and_their_joins_on_int8(tmp_path):
    m = c2f()
    units = ["a", "a_sig", "a_mul", "b", "b_sig", "b_mul", "c", "c_sig", "c_mul"]
    tensors = sorted({t for n in m.graph.node for t in [*n.input, *n.output]
                      if t and t not in {i.name for i in m.graph.initializer}})
    from convgraph.model.loader import load

    cg = load(m)
    ranges = calibrate_ranges(m, tensors, feeds(), "minmax", types=cg.shapes)
    q = quantize_model(m, units, ranges, method="minmax", reduce=False)
    ops = optimized_ops(q, tmp_path)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearConcat") == 1 and "Concat" not in ops
    # one quantization per tensor the units share: a's output is quantized once, however many read it
    qs = [n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == len(set(qs))
    import onnxruntime as ort

    x = feeds(1, seed=7)[0]
    a = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_weights_held_by_constant_nodes_are_quantized_too(tmp_path):
    """PP-OCR det keeps its weights in Constant nodes: they become initializers before the quantizer sees them."""
    m = c2f()
    inits = {t.name: t for t in m.graph.initializer if t.name.endswith("_w")}
    for name, t in inits.items():
        m.graph.node.insert(0, helper.make_node("Constant", [], [name], value=t))
        m.graph.initializer.remove(t)
    units = ["a", "a_sig", "a_mul", "b", "b_sig", "b_mul", "c", "c_sig", "c_mul"]
    from convgraph.model.loader import load

    tensors = sorted({t for n in m.graph.node if n.op_type != "Constant" for t in [*n.input, *n.output]
                      if t and t not in {i.name for i in m.graph.initializer} and t not in inits})
    ranges = calibrate_ranges(m, tensors, feeds(), "minmax", types=load(m).shapes)
    q = quantize_model(m, units, ranges, method="minmax", reduce=False)
    assert optimized_ops(q, tmp_path).count("QLinearConv") == 3 and "Constant" not in [n.op_type for n in q.graph.node]


def _fitted(m: onnx.ModelProto):
    from convgraph.analysis.analyze import analyze
    from convgraph.model.loader import load
    from convgraph.optimize import int8
    from convgraph.optimize.fitting import Fitted
    from convgraph.registry import get_rule

    cg = load(m)
    recs = {r.node_id: r for r in analyze(cg, rewrites=False).convs}
    params = get_rule("int8").resolve_params({"calibration": "minmax"})
    ranges = int8.calibrate(m, cg, [(r, params) for r in recs.values()], feeds())
    return Fitted(m, cg, recs, None, None, ranges)


def test_the_optimizer_quantizes_a_plans_int8_steps_together(tmp_path):
    fitted = _fitted(c2f())
    plan = {n: ("int8", {"calibration": "minmax"}) for n in ("a", "b", "c")}
    m, notes = fitted.model(plan)
    ops = optimized_ops(m, tmp_path)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearConcat") == 1 and fitted.joint_failed is None
    assert all(notes[n].endswith("its Sigmoid+Mul in int8 too") for n in plan)
    one, _ = fitted.model({"b": plan["b"]})  # one step alone: spliced as judged alone, no joins
    assert optimized_ops(one, tmp_path).count("QLinearConv") == 1


def test_when_quantizing_together_fails_each_unit_is_quantized_alone(tmp_path, monkeypatch):
    from convgraph.engine import quantize
    from convgraph.errors import ModelError

    def refuse(*args, **kwargs):
        raise ModelError("onnxruntime's quantizer failed: (a model it cannot take)")

    monkeypatch.setattr(quantize, "quantize_model", refuse)
    fitted = _fitted(c2f())
    m, _ = fitted.model({n: ("int8", {"calibration": "minmax"}) for n in ("a", "b", "c")})
    assert fitted.joint_failed and "cannot take" in fitted.joint_failed
    ops = optimized_ops(m, tmp_path)
    assert ops.count("QLinearConv") == 3 and "QLinearConcat" not in ops


def test_activation_float_quantizes_the_conv_alone(tmp_path):
    res = rewrite(c2f(), ["int8"], params={"activation": "float"}, calib=feeds(), verify=False)
    assert all(c.old_nodes == [c.node] for c in res.report.changes) and len(res.report.changes) == 3
    ops = optimized_ops(res.model, tmp_path)
    assert ops.count("QLinearConv") == 3 and "QLinearSigmoid" not in ops
