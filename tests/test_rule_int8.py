"""Rule ``int8``: convs in QDQ form by onnxruntime's quantizer, run by onnxruntime as int8 kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.errors import UsageError
from convgraph.engine.quantize import int8_kernels
from convgraph.engine.rewrite import Selection, rewrite

from helpers import REAL, image_folder, run, run_cli, smooth_feeds


def chain(opset: int = 17, *, act: str | None = "Relu", channels=(3, 8, 8, 4), dtype=np.float32, seed: int = 0,
          spatial: int = 2, size: int = 16) -> onnx.ModelProto:
    """x → conv0 → act → conv1 → act → conv2 → y: 3×3 convs (the middle one depthwise when it can be)."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, x = [], [], "x"
    for i, (ci, co) in enumerate(zip(channels, channels[1:])):
        g = ci if i == 1 and ci == co else 1
        w = (rng.standard_normal((co, ci // g) + (3,) * spatial) / np.sqrt(9 * ci / g)).astype(dtype)
        b = (rng.standard_normal(co) * 0.1).astype(dtype)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == len(channels) - 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], name=f"conv{i}", group=g,
                                      pads=[1] * 2 * spatial))
        x = out
        if act and out != "y":
            nodes.append(helper.make_node(act, [out], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    shape = [1, channels[0]] + [size] * spatial
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, [None] * (2 + spatial))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(n: int = 6, seed: int = 1, shape=(1, 3, 16, 16)) -> list[dict]:
    return smooth_feeds(n, seed, shape)


def test_every_conv_becomes_an_int8_kernel_with_its_error_alone():
    model = chain()
    res = rewrite(model, ["int8"], calib=feeds(), inputs=feeds(2, seed=9))
    rep = res.report
    assert [c.node for c in rep.changes] == ["conv0", "conv1", "conv2"]
    for c in rep.changes:
        assert not c.exact and c.quantized.startswith("int8 QDQ") and c.kind_after.endswith("(int8)")
        assert c.checked_on.startswith("activations") and 0 < c.output_error < 0.5 and c.output_cosine > 0.99
        assert 0 < c.weight_error < 0.02  # per-channel int8: about 1/127 of each filter's largest weight
    assert rep.checks["int8 kernels"].startswith("3 of 3 quantized convs run as QLinearConv")
    assert int8_kernels(res.model) == {"conv0", "conv1", "conv2"}
    ops = [n.op_type for n in res.model.graph.node]
    # each Relu joins its conv's unit (folded into the output range by the quantizer), and conv1 and conv2 read
    # the DequantizeLinear of the unit before: x, a0, a1 and y quantized once each
    assert ops.count("QuantizeLinear") == 4 and ops.count("Conv") == 3 and "Relu" not in ops
    assert [c.notes.endswith("its Relu in int8 too") for c in rep.changes] == [True, True, False]
    x = feeds(1, seed=5)[0]
    a, b = run(model, x)[0], run(res.model, x)[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    # per-channel symmetric int8 weights (axis 0), uint8 activations, int32 bias
    dq = {n.output[0]: n for n in res.model.graph.node if n.op_type == "DequantizeLinear"}
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    w_dq, x_dq, b_dq = dq[conv.input[1]], dq[conv.input[0]], dq[conv.input[2]]
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert inits[w_dq.input[0]].dtype == np.int8 and inits[w_dq.input[1]].shape == (8,)
    assert not inits[w_dq.input[2]].any() and np.abs(inits[w_dq.input[0]]).max() == 127
    assert inits[x_dq.input[0] if x_dq.input[0] in inits else x_dq.input[2]].dtype == np.uint8
    assert inits[b_dq.input[0]].dtype == np.int32


def test_consecutive_convs_share_one_quantization():
    """conv → conv with nothing between: the second reads the first's DequantizeLinear, no second pair."""
    res = rewrite(chain(act=None), ["int8"], calib=feeds(), inputs=feeds(1))
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("QuantizeLinear") == 4  # x, and each conv's output
    assert res.report.checks["int8 kernels"].startswith("3 of 3")


def test_nodes_selects_and_the_others_stay_float():
    res = rewrite(chain(), ["int8"], calib=feeds(), selection=Selection(nodes="conv1"), inputs=feeds(1))
    assert [c.node for c in res.report.changes] == ["conv1"]
    assert int8_kernels(res.model) == {"conv1"}


def test_without_calib_the_rule_refuses_naming_the_flag(tmp_path, capsys):
    with pytest.raises(UsageError, match="--calib"):
        rewrite(chain(), ["int8"])
    path = tmp_path / "m.onnx"
    onnx.save(chain(), path)
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "int8", "-o", tmp_path / "o.onnx")
    assert code == 2 and "--calib" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
    assert "Traceback" not in err


def test_the_cli_writes_the_model_and_json_stays_json(tmp_path, capsys):
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(chain(), path)
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds(4)]))
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "int8", "--calib", calib, "--param",
                             "calibration=minmax", "--no-bench", "--json", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    doc = json.loads(out)  # onnxruntime's calibrator prints to stdout: none of it may reach here
    assert doc["output"] and doc["checks"]["int8 kernels"].startswith("3 of 3")
    assert [r["params"] for r in doc["rules"]] == [{"calibration": "minmax", "activation": "int8", "reduce_range": "auto"}]
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "int8", "--calib", calib, "--param",
                             "calibration=median", "-o", tmp_path / "p.onnx")
    assert code == 2 and "entropy, percentile, minmax" in err


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_each_calibration_method_gives_a_working_model(method):
    res = rewrite(chain(), ["int8"], params={"calibration": method}, calib=feeds(), inputs=feeds(1))
    assert res.report.checks["int8 kernels"].startswith("3 of 3")
    assert method in res.report.changes[0].quantized
    assert max(c.output_error for c in res.report.changes) < 0.1


def test_percentile_clips_an_outlier_that_minmax_keeps():
    calib = feeds(4, shape=(1, 3, 128, 128))  # 196,608 values: one above the 99.999th percentile
    calib[0]["x"] = calib[0]["x"].copy()
    calib[0]["x"][0, 0, 0, 0] = 1000.0  # one wild pixel
    scales = {}
    for method in ("minmax", "percentile"):
        m = rewrite(chain(size=128), ["int8"], params={"calibration": method}, calib=calib, verify=False).model
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        scales[method] = float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == q.input[1])))
    assert scales["minmax"] > 1000 / 255 * 0.99 and scales["percentile"] < scales["minmax"] / 20


def test_reduce_range_quantizes_weights_to_seven_bits():
    for setting, top in (("yes", 64), ("no", 127)):
        m = rewrite(chain(), ["int8"], params={"reduce_range": setting}, calib=feeds(), verify=False).model
        w = [numpy_helper.to_array(t) for t in m.graph.initializer if numpy_helper.to_array(t).dtype == np.int8]
        assert max(int(np.abs(a).max()) for a in w) == top


def test_an_opset_12_model_is_converted_first_and_the_report_says_so():
    model = chain(opset=12)
    res = rewrite(model, ["int8"], calib=feeds(), inputs=feeds(1))
    assert any("opset 12 to 13" in n and "version_converter" in n for n in res.report.notes)
    assert next(o.version for o in res.model.opset_import if o.domain == "") == 13
    onnx.checker.check_model(res.model, full_check=True)
    axes = [a.i for n in res.model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes and set(axes) == {0}


def test_what_int8_leaves_alone_and_why():
    half = chain(dtype=np.float16)
    res = rewrite(half, ["int8"], calib=[{k: v.astype(np.float16) for k, v in f.items()} for f in feeds(2)])
    assert not res.report.changes
    assert {e.reason for e in res.report.explain} == {"int8 is calibrated from float32 models: quantize the float32 "
                                                      "model, not this one"}
    once = rewrite(chain(), ["int8"], calib=feeds(), verify=False).model
    again = rewrite(once, ["int8"], calib=feeds(), verify=False)
    assert not again.report.changes and all("already quantized" in e.reason for e in again.report.explain)


def test_1d_and_3d_convs_run_as_int8_kernels():
    for spatial in (1, 3):
        model = chain(spatial=spatial, channels=(2, 4, 4, 2))
        shape = (1, 2) + (16,) * spatial
        calib = [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(3)]
        res = rewrite(model, ["int8"], calib=calib, inputs=calib[:1])
        assert res.report.changes and res.report.checks["int8 kernels"].startswith(f"{len(res.report.changes)} of")


def test_nan_in_calibration_data_is_refused():
    calib = feeds(2)
    calib[1]["x"] = np.full_like(calib[1]["x"], np.nan)  # onnxruntime's calibrators would skip it silently
    with pytest.raises(UsageError, match="calibration sample 1 has NaN/Inf values in input 'x'"):
        rewrite(chain(), ["int8"], calib=calib, verify=False)


# ---- the real models ------------------------------------------------------------------------------------------
def _images(tmp_path, names, size):
    return image_folder(tmp_path / f"img{size}", names)


@pytest.mark.real
@pytest.mark.slow
def test_yolov8n_every_conv_runs_as_int8(real_models, tmp_path):
    path = real_models("yolov8n")
    calib = _images(tmp_path, ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"], 320)
    res = rewrite(str(path), ["int8"], calib=str(calib), input_shapes=REAL["yolov8n"], bench=False,
                  input_options={"image_size": (320, 320)})
    assert len(res.report.changes) == 64
    assert res.report.checks["int8 kernels"] == "64 of 64 quantized convs run as QLinearConv (onnxruntime's optimized graph)"
    assert all(c.output_cosine > 0.95 for c in res.report.changes)


@pytest.mark.real
@pytest.mark.slow
def test_ppocr_det_is_converted_to_opset_13_and_quantized(real_models, tmp_path):
    path = real_models("ppocr-det")
    calib = _images(tmp_path, ["page.png", "text.png"], 320)
    res = rewrite(str(path), ["int8"], calib=str(calib), input_shapes={"x": [1, 3, 320, 320]}, bench=False,
                  input_options={"image_size": (320, 320), "mean": [0.5] * 3, "std": [0.5] * 3})
    assert any("opset 12 to 13" in n for n in res.report.notes)
    n = len(res.report.changes)
    assert n == 62 and res.report.checks["int8 kernels"].startswith(f"{n} of {n} ")
    # its weights were Constant nodes: each conv now reads an int8 initializer through a DequantizeLinear
    assert sum(t.data_type == TensorProto.INT8 and len(t.dims) == 4 for t in res.model.graph.initializer) == n
    worst = min(res.report.changes, key=lambda c: c.output_cosine)
    assert worst.output_cosine > 0.9, (worst.node, worst.output_cosine)
