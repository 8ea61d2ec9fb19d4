"""QDQ (int8) models through the other rules: rewritten in float, quantized again, held to the noise of that."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.errors import UsageError
from convgraph.engine.quantize import float_twin, int8_kernels
from convgraph.engine.rewrite import rewrite
from convgraph.run.runtime import create_session, expose_tensors, run

from helpers import REAL, image_folder, run_cli, smooth_feeds
from test_rule_int8 import chain


def ort_int8(model: onnx.ModelProto, feeds: list[dict], tmp_path, method: str = "MinMax") -> onnx.ModelProto:
    """onnxruntime's own quantize_static of every conv (QDQ, per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            self.left = list(feeds)

        def get_next(self):
            return self.left.pop(0) if self.left else None

    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                    calibrate_method=getattr(CalibrationMethod, method))
    return onnx.load(dst)


def cosines(a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict], tensor: str) -> list[float]:
    sa, sb = (create_session(expose_tensors(m, [tensor])) for m in (a, b))
    out = []
    for f in feeds:
        x, y = (np.asarray(run(s, f, [tensor])[0], np.float64).ravel() for s in (sa, sb))
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return out


@pytest.fixture(scope="module")
def int8_chain(tmp_path_factory):
    model = chain(channels=(3, 8, 16, 8))  # conv0 3→8, conv1 8→16 (standard), conv2 16→8
    return ort_int8(model, smooth_feeds(6, 1, (1, 3, 16, 16)), tmp_path_factory.mktemp("q"))


@pytest.mark.parametrize("rule", ["separable", "low-rank", "spatial-separable"])
def test_exact_rules_on_an_int8_model_stay_int8_and_exact_within_requantization(int8_chain, rule):
    calib, held = smooth_feeds(6, 1, (1, 3, 16, 16)), smooth_feeds(3, 7, (1, 3, 16, 16))
    res = rewrite(int8_chain, [rule], params={"rank": "full"}, calib=calib, inputs=held)
    rep = res.report
    assert len(rep.changes) == 3
    for c in rep.changes:
        assert c.exact and c.kind_after.endswith("(int8)") and "quantized again" in c.notes
        assert c.tolerance["measure"] == "rms" and c.tolerance["basis"].startswith("int8 requantization")
        assert c.output_rms <= c.tolerance["limit"] and c.checked_on == "activations"
    new_convs = sum(n.op_type == "Conv" for n in res.model.graph.node)
    assert rep.checks["int8 kernels"] == f"{new_convs} of {new_convs} quantized convs run as QLinearConv " \
                                         "(onnxruntime's optimized graph)"
    assert int8_kernels(res.model) >= {n.name for n in res.model.graph.node if n.op_type == "Conv"}
    assert "its float twin" in rep.checks["model tolerance"]
    assert min(cosines(int8_chain, res.model, held, "y")) > 0.99
    # the existing activation quantization is kept: no new QuantizeLinear on the convs' inputs and outputs
    before = {n.input[0] for n in int8_chain.graph.node if n.op_type == "QuantizeLinear"}
    after = {n.input[0] for n in res.model.graph.node if n.op_type == "QuantizeLinear"}
    assert before <= after and all(t.startswith(tuple(c.node for c in rep.changes)) for t in after - before)


def test_new_activations_need_calib_and_the_refusal_names_it(int8_chain, tmp_path, capsys):
    with pytest.raises(UsageError, match="--calib"):
        rewrite(int8_chain, ["separable"], params={"rank": "full"})
    path = tmp_path / "q.onnx"
    onnx.save(int8_chain, path)
    code, _, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--param", "rank=full", "-o",
                           tmp_path / "o.onnx")
    assert code == 2 and "--calib" in err and "new activations" in err and not (tmp_path / "o.onnx").exists()


def qdq_conv_bn(seed: int = 0) -> onnx.ModelProto:
    """x → Q → DQ → Conv (int8 weights per channel, int32 bias) → BatchNormalization → Q → DQ → y."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6
    ws = np.abs(w).reshape(8, -1).max(1) / 127
    wq = np.round(w / ws[:, None, None, None]).astype(np.int8)
    sx, sy = np.float32(4 / 255), np.float32(0.05)
    bq = np.round(rng.standard_normal(8) * 0.1 / (sx * ws)).astype(np.int32)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("sx", sx), ("zx", np.uint8(128)), ("wq", wq), ("ws", ws.astype(np.float32)), ("wz", np.zeros(8, np.int8)),
        ("bq", bq), ("bs", (sx * ws).astype(np.float32)), ("bz", np.zeros(8, np.int32)),
        ("sy", sy), ("zy", np.uint8(128)), ("gamma", rng.uniform(0.5, 2, 8).astype(np.float32)),
        ("beta", rng.standard_normal(8).astype(np.float32) * 0.1), ("mean", rng.standard_normal(8).astype(np.float32)),
        ("var", rng.uniform(0.5, 2, 8).astype(np.float32))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], name="dqb", axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("QuantizeLinear", ["n", "sy", "zy"], ["nq"], name="qy"),
             helper.make_node("DequantizeLinear", ["nq", "sy", "zy"], ["y"], name="dqy")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_fold_bn_through_qdq_needs_no_calibration_and_runs_as_int8():
    model = qdq_conv_bn()
    assert not int8_kernels(model)  # the BatchNormalization between the conv and its Q keeps it in float
    feeds = [{"x": np.random.default_rng(i).uniform(-2, 2, (1, 4, 12, 12)).astype(np.float32)} for i in range(2)]
    res = rewrite(model, ["fold-bn"], inputs=feeds)
    c = res.report.changes[0]
    assert c.exact and c.kind_after.endswith("(int8)") and c.quantized and "scale(s) kept" in c.quantized
    assert "calibrat" not in c.quantized  # both activations keep the scales the model has
    assert int8_kernels(res.model) == {"conv"} and res.report.checks["int8 kernels"].startswith("1 of 1")
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and "BatchNormalization" not in ops
    assert c.output_rms <= c.tolerance["limit"]


def test_a_rewrite_that_is_not_exact_before_requantizing_is_refused(int8_chain, monkeypatch):
    from convgraph.rules import separable

    real = separable.factor

    def broken(w, group, rank):
        dw, pw, err = real(w, group, rank)
        return dw, pw * 1.01, err  # 1% off: far beyond float rounding, within int8 noise after requantizing

    monkeypatch.setattr(separable, "factor", broken)
    calib = smooth_feeds(4, 1, (1, 3, 16, 16))
    with pytest.raises(Exception, match="not exact before requantizing"):
        rewrite(int8_chain, ["separable"], params={"rank": "full", "fit": "weights"}, calib=calib, inputs=calib[:1])


def test_float_twin_takes_out_the_activation_quantization(int8_chain):
    twin = float_twin(int8_chain)
    ops = [n.op_type for n in twin.graph.node]
    assert "Identity" in ops and int8_kernels(twin) == set()
    feeds = smooth_feeds(2, 3, (1, 3, 16, 16))
    c = cosines(int8_chain, twin, feeds, "y")
    assert all(0.99 < v < 1.0 for v in c)


def test_weight_only_quantized_convs_are_rewritten_in_float():
    """DequantizeLinear weights, float input: nothing to keep quantized around it; the rewrite stays float."""
    model = qdq_conv_bn()
    g = model.graph
    keep = [n for n in g.node if n.name not in ("qx", "dqx", "bn", "qy", "dqy")]
    keep[-1].input[0] = "x"
    keep[-1].output[0] = "y"
    del g.node[:]
    g.node.extend(keep)
    res = rewrite(model, ["separable"], params={"rank": "full"},
                  inputs=[{"x": np.random.default_rng(0).standard_normal((1, 4, 12, 12)).astype(np.float32)}])
    c = res.report.changes[0]
    assert not c.quantized and "dequantized into a float initializer" in c.notes and c.tolerance["measure"] == "scaled"


# ---- the real model: onnxruntime's own int8 YOLOv8n ---------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo_int8(real_models, tmp_path_factory):
    from convgraph.run.inputs import make_inputs

    tmp = tmp_path_factory.mktemp("yolo")
    path = real_models("yolov8n")
    model = onnx.load(path)
    calib_dir = image_folder(tmp / "calib", ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                             "motorcycle_left.png", "coins.png"])
    calib = make_inputs(model, str(calib_dir), input_shapes=REAL["yolov8n"], image_size=(320, 320))
    photos = make_inputs(model, str(image_folder(tmp / "photos", ["camera.png", "motorcycle_right.png", "horse.png"])),
                         input_shapes=REAL["yolov8n"], image_size=(320, 320))
    return ort_int8(model, [calib[i] for i in range(len(calib))], tmp), calib, photos


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("rule", ["separable", "low-rank", "spatial-separable"])
def test_ort_int8_yolov8n_through_exact_rules(yolo_int8, rule):
    q, calib, photos = yolo_int8
    res = rewrite(q, [rule], params={"rank": "full"}, calib=calib, inputs=photos, input_shapes=REAL["yolov8n"])
    rep = res.report
    k = 2 * len(rep.changes)  # each rewritten conv is two
    assert rep.changes and all(c.exact and c.kind_after.endswith("(int8)") for c in rep.changes)
    assert rep.checks["int8 kernels"] == f"{k} of {k} quantized convs run as QLinearConv (onnxruntime's optimized graph)"
    convs = {node.name for node in res.model.graph.node if node.op_type == "Conv"}
    assert len(convs) == 64 + len(rep.changes) and int8_kernels(res.model) == convs  # the others stay int8 too
    assert min(cosines(q, res.model, [photos[i] for i in range(len(photos))], "output0")) >= 0.99
