"""The exact-capable rules: separable, transpose-subpixel, dense, fold-bn.

Each rewrite is checked against onnxruntime running the original (or against the expected outputs
that onnx's own test data ships): max abs error / max abs output within 1e-4 (1e-5 for the
sub-pixel rewrite against onnx's ConvTranspose cases).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph.analysis.analyze import analyze
from convgraph.errors import UsageError
from convgraph.engine.rewrite import rewrite
from convgraph.registry import all_rules, get_rule
from convgraph.rule import RuleContext
from helpers import EXACT_TOL, ONNX_DATA, assert_same, onnx_case, op_types, random_x, rel_err, rewrite_with, run, single_op

OPS = {"Conv", "ConvTranspose"}


# ---- helpers (also used by test_rules_exact_hypothesis.py) ---------------------------------------


# ---- the rules and their interface ---------------------------------------------------------------
def test_rules_are_registered_with_their_contract():
    rules = all_rules()
    for name in ("separable", "transpose-subpixel", "dense", "fold-bn"):
        assert name in rules and rules[name].summary and rules[name].estimate is not None
    assert rules["fold-bn"].prepass and not rules["separable"].prepass
    assert rules["dense"].is_exact({}) and rules["transpose-subpixel"].is_exact({}) and rules["fold-bn"].is_exact({})
    sep = rules["separable"]
    assert sep.resolve_params({}) == {"rank": 1, "fit": "data", "response": "pre", "layout": "auto"}
    assert sep.is_exact(sep.resolve_params({"rank": "full"})) and not sep.is_exact(sep.resolve_params({"rank": "2"}))
    for bad in ({"rank": "0"}, {"rank": "two"}, {"layout": "diagonal"}):
        with pytest.raises(UsageError, match="separable"):
            sep.resolve_params(bad)
    assert not any(r.startswith("_") for r in rules)


# ---- separable -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rewritten", [
    ("standard", 3),  # strides, auto_pad SAME_UPPER, 5×5 and 7×7
    ("grouped", 2),  # group 4 and 2: per group, grouped pointwise
    ("conv1d", 3),  # 1D, causal pads, dilation 2
    ("conv3d", 1),
    ("constant_weights", 2),  # weights from Constant and DequantizeLinear (the 1×1 is not standard)
    ("dynamic", 2),  # symbolic batch and spatial dims
    ("sample", 4),
])
@pytest.mark.parametrize("layout", ["multiplier", "tiled"])
def test_separable_full_rank_is_exact_on_sample_models(models_dir, name, rewritten, layout):
    path = models_dir / f"{name}.onnx"
    shapes = {"x": [2, 3, 20, 20]} if name == "dynamic" else None
    out, reps, _ = rewrite_with(path, "separable", {"rank": "full", "layout": layout})
    assert len(reps) == rewritten
    assert all(r.exact and r.weight_error == 0.0 for r in reps)
    model = onnx.load(str(path))
    x_shape = shapes["x"] if shapes else [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert_same(model, out, {"x": random_x(x_shape)})


def test_separable_in_a_subgraph(models_dir):
    path = models_dir / "subgraph.onnx"
    out, reps, reasons = rewrite_with(path, "separable", {"rank": "full"})
    assert len(reps) == 2 and "else/conv" in reasons  # main/conv and then/conv; the else branch is 1×1
    then = next(a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert [n.name for n in then.node if n.op_type == "Conv"] == ["then/conv/dw", "then/conv/pw"]
    x = np.abs(random_x([1, 4, 16, 16]))  # mean > 0: the rewritten then-branch runs
    assert_same(path, out, {"x": x})
    assert_same(path, out, {"x": -x})


def test_separable_names_attributes_and_estimate(models_dir):
    path = models_dir / "standard.onnx"
    cg = convgraph.load(path)
    rec = next(r for r in analyze(cg, rewrites=False).convs if r.name == "conv5x5_s2")
    rule = get_rule("separable")
    ctx = RuleContext(cg, {rec.node_id: rec})
    assert rule.match(rec, ctx) is None
    params = rule.resolve_params({"rank": "3", "layout": "multiplier"})
    rep = rule.build(rec, ctx, params)
    dw, pw = rep.nodes
    assert (dw.name, pw.name) == ("conv5x5_s2/dw", "conv5x5_s2/pw")
    assert list(dw.output) == ["conv5x5_s2/dw"] and list(pw.output) == [rec.output]
    assert [t.name for t in rep.initializers] == ["conv5x5_s2/dw_W", "conv5x5_s2/pw_W", "conv5x5_s2/pw_B"]
    a = {x.name: helper.get_attribute_value(x) for x in dw.attribute}
    assert a["group"] == rec.in_channels and a["strides"] == [2, 2] and a["auto_pad"] == b"SAME_UPPER"
    assert a["kernel_shape"] == [5, 5]
    assert rep.initializers[0].dims == [rec.in_channels * 3, 1, 5, 5]
    assert rep.initializers[1].dims == [rec.out_channels, rec.in_channels * 3, 1, 1]
    assert not rep.exact and 0 < rep.weight_error < 1
    # the estimate is what the analyzer counts on the rewritten model
    cg.replace([rec.node_id], rep.nodes, rep.initializers)
    after = {r.name: r for r in analyze(convgraph.load(cg.to_model()), rewrites=False).convs}
    new = [after["conv5x5_s2/dw"], after["conv5x5_s2/pw"]]
    assert rep.macs_after == sum(r.macs for r in new) and rep.params_after == sum(r.params for r in new)
    assert after["conv5x5_s2/dw"].kind == "depthwise" and after["conv5x5_s2/pw"].kind == "pointwise"


def _truncated(w: np.ndarray, group: int, rank: int) -> np.ndarray:
    """Per group and input channel, the best rank-r approximation of W[:, c] (independent of the rule)."""
    out = np.zeros_like(w, dtype=np.float64)
    cog = w.shape[0] // group
    for g in range(group):
        for c in range(w.shape[1]):
            m = w[g * cog:(g + 1) * cog, c].reshape(cog, -1).astype(np.float64)
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            out[g * cog:(g + 1) * cog, c] = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(out[g * cog:(g + 1) * cog, c].shape)
    return out


@pytest.mark.parametrize("layout", ["multiplier", "tiled"])
@pytest.mark.parametrize("group", [1, 2])
def test_separable_rank_r_is_the_best_rank_r_conv(layout, group):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 6 // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    attrs = dict(pads=[1, 0, 1, 2], strides=[1, 2], group=group)
    model = single_op("Conv", [1, 6, 9, 10], w, b, **attrs)
    out, (rep,), _ = rewrite_with(model, "separable", {"rank": "2", "layout": layout})
    best = _truncated(w, group, 2)
    assert rep.weight_error == pytest.approx(np.linalg.norm(w - best) / np.linalg.norm(w), rel=1e-6)
    assert not rep.exact
    reference = single_op("Conv", [1, 6, 9, 10], best.astype(np.float32), b, **attrs)
    assert_same(reference, out, {"x": random_x([1, 6, 9, 10])})
    assert ("Concat" in op_types(out)) == (layout == "tiled")
    assert ("Split" in op_types(out)) == (layout == "tiled" and group > 1)


@pytest.mark.parametrize("opset", [11, 17, 18])  # Split: equal parts by default before 18, num_outputs from 18
def test_separable_tiled_grouped_across_opsets(opset):
    w = random_x([8, 3, 3, 3], seed=20)
    model = single_op("Conv", [1, 6, 7, 7], w, group=2, pads=[1, 1, 1, 1], opset=opset)
    out, (rep,), _ = rewrite_with(model, "separable", {"rank": "full", "layout": "tiled"})
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert [a.name for a in split.attribute] == (["axis", "num_outputs"] if opset >= 18 else ["axis"])
    assert_same(model, out, {"x": random_x([1, 6, 7, 7])})


@pytest.mark.parametrize("shape, rank, expect", [
    ([1, 8, 10, 10], "2", "tiled"),  # 2D, 16 depthwise channels: multiplier-1 depthwise is faster
    ([1, 4, 10, 10], "3", "multiplier"),  # 12 depthwise channels: too few
    ([1, 8, 30], "2", "multiplier"),  # 1D: multiplier is faster
    ([1, 8, 6, 6, 6], "2", "multiplier"),  # 3D
    ([1, 8, 10, 10], "1", "multiplier"),  # rank 1: nothing to tile
])
def test_separable_auto_layout(shape, rank, expect):
    nd = len(shape) - 2
    w = random_x([8, shape[1]] + [3] * nd, seed=4)
    model = single_op("Conv", shape, w, pads=[1] * 2 * nd)
    out, (rep,), _ = rewrite_with(model, "separable", {"rank": rank})
    assert f"layout {expect}" in rep.notes
    assert ("Concat" in op_types(out)) == (expect == "tiled")


def test_separable_keeps_float16():
    w = random_x([6, 4, 3, 3], seed=5).astype(np.float16)
    b = random_x([6], seed=6).astype(np.float16)
    model = single_op("Conv", [1, 4, 8, 8], w, b, elem=TensorProto.FLOAT16, pads=[1, 1, 1, 1])
    out, reps, _ = rewrite_with(model, "separable", {"rank": "full"})
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    x = random_x([1, 4, 8, 8], seed=7, dtype=np.float16)
    (y0,), (y1,) = run(model, {"x": x}), run(out, {"x": x})
    assert y1.dtype == np.float16 and rel_err(y0, y1) < 5e-3


def test_separable_refuses_with_reasons(models_dir):
    expected = {
        "depthwise": {"dw3x3": "depthwise", "dw3x3_mult2": "depthwise"},
        "pointwise": {"conv1x1": "pointwise"},
        "transposed": {"up_k2s2": "not Conv"},
        "quantized": {"qconv": "quantized", "convint": "quantized"},
    }
    for name, want in expected.items():
        _, reps, reasons = rewrite_with(models_dir / f"{name}.onnx", "separable")
        assert not reps
        for node, text in want.items():
            matching = [why for n, why in reasons.items() if n == node or n.startswith(node)]
            assert matching and text in matching[0], (name, reasons)
    # a weight fed at run time cannot be factored
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])])
    _, reps, reasons = rewrite_with(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "separable")
    assert not reps and "not a constant" in reasons["conv"]


@pytest.mark.parametrize("case", ["test_Conv2d", "test_Conv2d_groups", "test_Conv2d_strided", "test_Conv2d_padding",
                                  "test_Conv1d_stride", "test_Conv3d_dilated_strided", "test_Conv2d_no_bias"])
def test_separable_full_rank_on_pytorch_conformance_models(case):
    model, feeds, expected = onnx_case(ONNX_DATA / "pytorch-converted" / case)
    out, reps, _ = rewrite_with(model, "separable", {"rank": "full"})
    assert len(reps) == 1
    assert rel_err(expected[0], run(out, feeds)[0]) <= EXACT_TOL


# ---- transpose-subpixel --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convtranspose_cases():
    """onnx's ConvTranspose node test cases (what ``backend/test/data/node/test_convtranspose*`` hold)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases("ConvTranspose") if c.name.startswith("test_convtranspose")]


def test_subpixel_every_onnx_convtranspose_case(convtranspose_cases):
    assert len(convtranspose_cases) >= 11
    for case in convtranspose_cases:
        (x, w, *b), (y,) = case.data_sets[0]
        node = case.model.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        model = single_op("ConvTranspose", list(x.shape), w, b[0] if b else None, **attrs)
        out, reps, reasons = rewrite_with(model, "transpose-subpixel")
        assert len(reps) == 1, (case.name, reasons)
        assert "ConvTranspose" not in op_types(out)
        assert rel_err(y, run(out, {"x": x})[0]) <= 1e-5, case.name


@pytest.mark.parametrize("case", ["pytorch-converted/test_ConvTranspose2d", "pytorch-converted/test_ConvTranspose2d_no_bias",
                                  "pytorch-operator/test_operator_convtranspose"])
def test_subpixel_on_pytorch_conformance_models(case):
    """Opset 6, IR 3 models with unequal strides and output_padding: Reshape/Transpose interleave, Slice attributes."""
    model, feeds, expected = onnx_case(ONNX_DATA / case)
    out, reps, _ = rewrite_with(model, "transpose-subpixel")
    assert len(reps) == 1 and "ConvTranspose" not in op_types(out)
    assert rel_err(expected[0], run(out, feeds)[0]) <= 1e-5


def test_subpixel_structure_and_estimate(models_dir):
    path = models_dir / "transposed.onnx"
    out, reps, _ = rewrite_with(path, "transpose-subpixel")
    assert [t for t in op_types(out) if t != "Relu"] == ["Conv", "DepthToSpace"] * 2  # no crop left
    k2, k3 = reps
    assert k2.kind_after == "pointwise+depth_to_space" and k3.kind_after == "grouped+depth_to_space"
    assert [n.name for n in k2.nodes] == ["up_k2s2/conv", "up_k2s2/d2s"]
    assert_same(path, out, {"x": random_x([1, 8, 8, 8])})
    cg = convgraph.load(path)
    recs = analyze(cg, rewrites=False).convs
    rule = get_rule("transpose-subpixel")
    after = {r.name: r for r in analyze(convgraph.load(out), rewrites=False).convs}
    for rec, rep in zip(recs, reps):  # what the analyzer offered is what it counts on the rewritten model
        conv = after[f"{rec.name}/conv"]
        assert rule.estimate(rec, {})[:2] == (rep.macs_after, rep.params_after) == (conv.macs, conv.params)
    assert after["up_k2s2/conv"].kernel == (1, 1)


@pytest.mark.parametrize("dims, kernel, strides, pads", [
    (["N", 3, "H", "W"], [3, 3], [2, 2], [1, 1, 1, 1]),  # DepthToSpace, crop by negative Slice ends
    (["N", 3, "H", "W"], [3, 4], [2, 3], [0, 1, 1, 0]),  # unequal strides, two unknown sizes: Shape-built shapes
    (["N", 3, "L"], [4], [3], [1, 2]),  # 1D, one unknown size: -1 in the Reshape
    ([1, 2, "D", 4, 5], [2, 3, 2], [2, 1, 3], [0, 1, 0, 1, 0, 1]),  # 3D, one unknown
])
def test_subpixel_with_unknown_input_sizes(dims, kernel, strides, pads):
    w = random_x([dims[1], 2, *kernel], seed=8)
    b = random_x([2], seed=9)
    model = single_op("ConvTranspose", dims, w, b, strides=strides, pads=pads, output_padding=[s - 1 for s in strides])
    out, reps, _ = rewrite_with(model, "transpose-subpixel")
    assert len(reps) == 1
    for size in (4, 7):
        shape = [d if isinstance(d, int) else (2 if d == "N" else size) for d in dims]
        assert_same(model, out, {"x": random_x(shape, seed=size)})
    assert out.graph.input[0] == model.graph.input[0]  # still dynamic


def test_subpixel_refuses_with_reasons():
    w = random_x([3, 2, 3, 3], seed=10)
    dynamic = single_op("ConvTranspose", [1, 3, "H", "W"], w, strides=[2, 2], output_shape=[9, 9])
    _, reps, reasons = rewrite_with(dynamic, "transpose-subpixel")
    assert not reps and "output_shape" in reasons["conv"] and "--input-shape" in reasons["conv"]
    _, reps, _ = rewrite_with(dynamic, "transpose-subpixel", input_shapes={"x": [1, 3, 5, 5]})
    assert len(reps) == 1
    old = single_op("ConvTranspose", [1, 3, 4, 4], w, strides=[2, 2], opset=4)
    old.ir_version = 3  # IR 3: initializers are graph inputs too
    old.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    _, reps, reasons = rewrite_with(old, "transpose-subpixel")
    assert not reps and "opset 4" in reasons["conv"]
    conv = single_op("Conv", [1, 2, 5, 5], random_x([3, 2, 3, 3]))
    assert "not ConvTranspose" in rewrite_with(conv, "transpose-subpixel")[2]["conv"]


# ---- dense ---------------------------------------------------------------------------------------
def test_dense_on_the_dilated_sample(models_dir):
    path = models_dir / "dilated.onnx"
    out, reps, reasons = rewrite_with(path, "dense")
    assert len(reps) == 2 and "not dilated" in reasons["conv_d1"]
    kernels = [helper.get_attribute_value(a) for n in out.graph.node for a in n.attribute if a.name == "kernel_shape"]
    assert kernels == [[3, 3], [5, 5], [9, 9]]
    assert not [a for n in out.graph.node[1:] for a in n.attribute if a.name == "dilations"]
    recs = {r.name: r for r in analyze(convgraph.load(path), rewrites=False).convs}
    assert reps[0].macs_after == recs["conv_d2"].macs // 9 * 25
    assert_same(path, out, {"x": random_x([1, 4, 32, 32])}, tol=1e-5)


@pytest.mark.parametrize("case", ["pytorch-converted/test_Conv2d_dilated", "pytorch-converted/test_Conv1d_dilated",
                                  "pytorch-converted/test_Conv3d_dilated", "pytorch-converted/test_Conv3d_dilated_strided"])
def test_dense_on_pytorch_conformance_models(case):
    model, feeds, expected = onnx_case(ONNX_DATA / case)
    out, reps, _ = rewrite_with(model, "dense")
    assert len(reps) == 1 and reps[0].exact
    assert rel_err(expected[0], run(out, feeds)[0]) <= EXACT_TOL


def test_dense_on_a_dilated_conv_transpose():
    w = random_x([4, 3, 3, 2], seed=11)
    model = single_op("ConvTranspose", [1, 4, 5, 6], w, random_x([6], seed=12), group=2, strides=[2, 1],
                      dilations=[2, 3], auto_pad="SAME_LOWER")
    out, (rep,), _ = rewrite_with(model, "dense")
    conv = out.graph.node[0]
    assert conv.op_type == "ConvTranspose" and conv.name == "conv/dense"
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["kernel_shape"] == [5, 4]
    assert_same(model, out, {"x": random_x([1, 4, 5, 6])})


# ---- fold-bn -------------------------------------------------------------------------------------
def test_fold_bn_on_the_conv_bn_sample(models_dir):
    path = models_dir / "conv_bn.onnx"
    original = onnx.load(str(path))
    bn_out = {n.input[0]: n.output[0] for n in original.graph.node if n.op_type == "BatchNormalization"}
    out, reps, _ = rewrite_with(path, "fold-bn")
    assert len(reps) == 2 and "BatchNormalization" not in op_types(out)
    for rep in reps:
        assert len(rep.removed) == 2 and rep.exact
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [c.name for c in convs] == ["block1/conv", "block2/conv"]
    assert all(c.output[0] in bn_out.values() for c in convs)
    assert_same(path, out, {"x": random_x([1, 4, 16, 16])})


def _bn_nodes(c: int, seed: int, outputs=("y",), **attrs):
    rng = np.random.default_rng(seed)
    params = [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.1, 3, c)]
    inits = [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, ("s", "bb", "m", "v"))]
    bn = helper.make_node("BatchNormalization", ["conv_out", "s", "bb", "m", "v"], list(outputs), name="bn", **attrs)
    return [bn], inits


@pytest.mark.parametrize("op, group", [("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2)])
def test_fold_bn_conv_and_conv_transpose(op, group):
    w = random_x([6, 4 // group, 3, 3] if op == "Conv" else [4, 6 // group, 3, 3], seed=13)
    bn, inits = _bn_nodes(6, 14, epsilon=1e-3)
    model = single_op(op, [2, 4, 7, 7], w, random_x([6], seed=15), group=group, strides=[2, 2], pads=[1, 1, 0, 0],
                      extra_nodes=bn, extra_inits=inits)
    out, (rep,), _ = rewrite_with(model, "fold-bn")
    assert op_types(out) == [op] and out.graph.node[0].name == "conv" and rep.removed == ["conv", "bn"]
    assert_same(model, out, {"x": random_x([2, 4, 7, 7])})


def test_fold_bn_refuses_with_reasons():
    w = random_x([6, 4, 3, 3], seed=16)
    bn, inits = _bn_nodes(6, 17, ("y", "mean", "var"), training_mode=1)
    training = single_op("Conv", [1, 4, 5, 5], w, extra_nodes=bn, extra_inits=inits, opset=15)
    assert "training" in rewrite_with(training, "fold-bn")[2]["conv"]
    bn, inits = _bn_nodes(6, 18)
    relu = helper.make_node("Relu", ["conv_out"], ["r"], name="relu")
    shared = single_op("Conv", [1, 4, 5, 5], w, extra_nodes=[*bn, relu], extra_inits=inits)
    shared.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None] * 4))
    assert "2 readers" in rewrite_with(shared, "fold-bn")[2]["conv"]
    plain = single_op("Conv", [1, 4, 5, 5], w)
    assert "graph output" in rewrite_with(plain, "fold-bn")[2]["conv"]
    relu_only = single_op("Conv", [1, 4, 5, 5], w, extra_nodes=[helper.make_node("Relu", ["conv_out"], ["y"])])
    assert "not followed by BatchNormalization" in rewrite_with(relu_only, "fold-bn")[2]["conv"]


# ---- through the engine --------------------------------------------------------------------------
def test_all_exact_rules_through_the_engine(models_dir):
    from convgraph.engine.rewrite import rewrite

    result = rewrite(models_dir / "sample.onnx", ["dense", "separable", "transpose-subpixel", "fold-bn"],
                     params={"rank": "full"})
    rules = [c.rule for c in result.report.changes]
    assert rules[0] == "fold-bn" and {"separable", "dense", "transpose-subpixel"} <= set(rules)
    assert all(c.exact and c.output_error is not None and c.output_error <= EXACT_TOL for c in result.report.changes)
    assert result.report.passed


# ---- real models ---------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("name, rule, params, shapes, count", [
    ("ppocr-det", "transpose-subpixel", {}, {"x": [1, 3, 320, 320]}, 2),
    ("yolov8n", "separable", {"rank": "full"}, {"images": [1, 3, 320, 320]}, 39),
    ("yolov8n", "split-conv", {}, {"images": [1, 3, 320, 320]}, 8),  # every C2f block's cv1
    ("ppocr-rec", "separable", {"rank": "full"}, {"x": [1, 3, 48, 320]}, None),
    ("ppocr-cls", "fold-bn", {}, {"x": [1, 3, 48, 192]}, 35),
    # BatchNormalization after its 2 ConvTranspose, 30 convs whose BatchNormalization Paddle exported as Mul → Add,
    # and a pointwise conv fed only by scales by constants (run alone, fold-bn takes HardSwish's "/ 6" too)
    ("ppocr-det", "fold-bn", {}, {"x": [1, 3, 320, 320]}, 33),
])
def test_exact_rules_on_real_models(real_models, name, rule, params, shapes, count):
    from convgraph.run.inputs import make_inputs

    path = real_models(name)
    out, reps, _ = rewrite_with(path, rule, params, input_shapes=shapes)
    assert reps and (count is None or len(reps) == count)
    assert all(r.exact for r in reps)
    if name == "ppocr-det":  # on noise the detector amplifies 1e-7 input changes to 0.3% at its output: a real page
        feeds = {"x": page_image(*shapes["x"][2:])}
    else:
        (feeds,) = make_inputs(onnx.load(str(path)), samples=1, input_shapes=shapes, seed=1)
    assert_same(path, out, feeds)


def page_image(height: int, width: int) -> np.ndarray:
    """scikit-image's scanned text page as a PP-OCR input: RGB, (x − 0.5) / 0.5, NCHW."""
    from PIL import Image
    from skimage import data

    img = np.asarray(Image.fromarray(data.page()).convert("RGB").resize((width, height)), np.float32) / 255.0
    return ((img - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def _affine_after_conv(ops) -> onnx.ModelProto:
    """x → conv (8 channels) → each of ``ops`` ((op, constant, constant first?)) in turn → y."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes, inits, x = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])], [w], "c"
    for i, (op, value, first) in enumerate(ops):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"k{i}"))
        out = f"t{i}"
        nodes.append(helper.make_node(op, [f"k{i}", x] if first else [x, f"k{i}"], [out], name=f"{op}{i}"))
        x = out
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_bn_folds_per_channel_mul_add_sub_div_chains():
    """Paddle's exports write BatchNormalization as Conv → Mul → Add: every per-channel or scalar Mul, Add, Sub
    (either side) and Div (by the constant) after the conv folds into its weights and bias, exactly."""
    per = np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(8, 1, 1)
    model = _affine_after_conv([("Mul", per, True), ("Add", per[None] - 1, False), ("Sub", 0.25, False),
                                ("Sub", per, True), ("Div", 3.0, False)])
    out, reps, _ = rewrite_with(model, "fold-bn")
    assert len(reps) == 1 and len(reps[0].removed) == 6 and op_types(out) == ["Conv"]
    assert_same(model, out, {"x": random_x([1, 3, 10, 10])})


def test_fold_bn_stops_at_what_is_not_affine_per_channel():
    # a constant that varies along H (not one value per channel), a Div of a constant by the tensor
    spatial = np.ones((1, 10, 1), np.float32)
    for ops, kept in (([("Mul", 2.0, False), ("Mul", spatial, False)], ["Conv", "Mul"]),
                      ([("Div", 2.0, True)], None)):
        model = _affine_after_conv(ops)
        if kept is None:
            res = rewrite(model, ["fold-bn"], verify=False)
            assert not res.report.changes
            assert "not followed by BatchNormalization or a Mul/Add/Sub/Div by constants" in res.report.explain[0].reason
        else:
            out, reps, _ = rewrite_with(model, "fold-bn")
            assert op_types(out) == kept
            assert_same(model, out, {"x": random_x([1, 3, 10, 10])})


def _conv_hardswish(opset: int, *, three: float = 3.0, last: str = "Div", clip_attrs: bool = False) -> onnx.ModelProto:
    """x → conv → x·clip(x + 3, 0, 6)/6 written out (Add, Clip, Mul, Div or Mul by 1/6) → y."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(three, np.float32), "three"),
             numpy_helper.from_array(np.array(6.0 if last == "Div" else 1 / 6, np.float32), "six")]
    clip = helper.make_node("Clip", ["p"], ["c"], name="clip", min=0.0, max=6.0) if clip_attrs else \
        helper.make_node("Clip", ["p", "lo", "hi"], ["c"], name="clip")
    if not clip_attrs:
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "three"], ["p"], name="add"), clip,
             helper.make_node("Mul", ["a", "c"], ["m"], name="mul"), helper.make_node(last, ["m", "six"], ["y"], name="last")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, last, clip_attrs, ops", [
    (14, "Div", False, ["Conv", "HardSwish"]),
    (13, "Mul", False, ["Conv", "HardSigmoid", "Mul"]),
    (10, "Div", True, ["Conv", "HardSigmoid", "Mul"]),  # Clip's bounds as attributes before opset 11
])
def test_fuse_hardswish_puts_the_written_out_activation_in_one_op(opset, last, clip_attrs, ops):
    model = _conv_hardswish(opset, last=last, clip_attrs=clip_attrs)
    out, reps, _ = rewrite_with(model, "fuse-hardswish")
    assert len(reps) == 1 and len(reps[0].removed) == 5 and op_types(out) == ops
    assert_same(model, out, {"x": random_x([1, 3, 10, 10]) * 4})  # inputs on both sides of −3 and 3


def test_fuse_hardswish_leaves_what_is_not_hardswish():
    res = rewrite(_conv_hardswish(14, three=2.0), ["fuse-hardswish"], verify=False)
    assert not res.report.changes and res.report.explain[0].reason == "the Add does not add 3"


def test_fold_bn_folds_the_scales_that_make_an_unpadded_convs_input():
    """A LearnableAffineBlock (x·a + c, scalars) before a pointwise conv folds into it: per input channel into the
    weights, the shift through them into the bias; before a padded conv only a shift of zero would (the padded
    border sees 0, not c), so there it stays."""
    rng = np.random.default_rng(7)
    for pads, folds in (([0, 0, 0, 0], True), ([1, 1, 1, 1], False)):
        k = 1 if not any(pads) else 3
        inits = [numpy_helper.from_array(rng.standard_normal((6, 4, k, k)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
                 numpy_helper.from_array(np.array(1.7, np.float32), "a"),
                 numpy_helper.from_array(np.array(-0.3, np.float32), "c")]
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["a", "r"], ["m"]),
                 helper.make_node("Add", ["m", "c"], ["s"]),
                 helper.make_node("Conv", ["s", "w", "b"], ["y"], name="conv", pads=pads)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 9, 9])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        res = rewrite(model, ["fold-bn"], verify=False)
        if not folds:
            assert not res.report.changes and "nor fed by one" in res.report.explain[0].reason
            continue
        out = res.model
        assert op_types(out) == ["Relu", "Conv"] and len(res.report.changes[0].old_nodes) == 3
        assert_same(model, out, {"x": random_x([1, 4, 9, 9])})


def test_fuse_hardswish_keeps_the_scale_and_shift_between_conv_and_activation():
    """Paddle's Conv → Mul → Add (its BatchNormalization) → HardSwish written out: the activation is fused, the
    Mul and Add stay for fold-bn, which runs after it."""
    model = _conv_hardswish(13)
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32).reshape(1, 8, 1, 1), "s"),
                          numpy_helper.from_array(np.full((1, 8, 1, 1), 0.2, np.float32), "t")])
    g.node[0].output[0] = "raw"
    g.node.insert(1, helper.make_node("Mul", ["raw", "s"], ["scaled"], name="bn_mul"))
    g.node.insert(2, helper.make_node("Add", ["scaled", "t"], ["a"], name="bn_add"))
    res = rewrite(model, ["fuse-hardswish", "fold-bn"], verify=False)
    assert [c.rule for c in res.report.changes] == ["fuse-hardswish", "fold-bn"]
    assert op_types(res.model) == ["Conv", "HardSigmoid", "Mul"]
    assert_same(model, res.model, {"x": random_x([1, 3, 10, 10]) * 4})


def test_fold_bn_folds_per_channel_input_scales_into_a_grouped_conv():
    """Per input channel scales and shifts before a grouped conv (4 groups of 2 channels, no padding): each output
    channel takes the scales of its own group's inputs."""
    rng = np.random.default_rng(11)
    a = rng.uniform(0.5, 2.0, (1, 8, 1, 1)).astype(np.float32)
    c = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(a, "a"), numpy_helper.from_array(c, "c")]
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Sub", ["m", "c"], ["s"]),
             helper.make_node("Conv", ["s", "w"], ["y"], name="conv", group=4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 7, 7])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, reps, _ = rewrite_with(model, "fold-bn")
    assert op_types(out) == ["Conv"]
    assert_same(model, out, {"x": random_x([1, 8, 9, 9])})


def _bn_hardswish_nodes(prefix: str, dtype) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x → conv → Mul, Add by per-channel constants (Paddle's BatchNormalization) → x·clip(x + 3, 0, 6)/6
    written out → {prefix}y, in ``dtype``."""
    rng = np.random.default_rng(7)
    consts = {"w": rng.standard_normal((8, 3, 3, 3)) * 0.5, "s": rng.uniform(0.5, 1.5, (1, 8, 1, 1)),
              "b": rng.standard_normal((1, 8, 1, 1)), "three": np.array(3.0), "lo": np.array(0.0),
              "hi": np.array(6.0), "six": np.array(6.0)}
    inits = [numpy_helper.from_array(v.astype(dtype), prefix + k) for k, v in consts.items()]
    p = prefix
    nodes = [helper.make_node("Conv", ["x", p + "w"], [p + "a"], name=p + "conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", [p + "a", p + "s"], [p + "m"], name=p + "scale"),
             helper.make_node("Add", [p + "m", p + "b"], [p + "n"], name=p + "shift"),
             helper.make_node("Add", [p + "n", p + "three"], [p + "q"], name=p + "add3"),
             helper.make_node("Clip", [p + "q", p + "lo", p + "hi"], [p + "c"], name=p + "clip"),
             helper.make_node("Mul", [p + "n", p + "c"], [p + "k"], name=p + "mul"),
             helper.make_node("Div", [p + "k", p + "six"], [p + "y"], name=p + "div")]
    return nodes, inits


def _exact_prepasses(model: onnx.ModelProto):
    res = rewrite(model, ["fuse-hardswish", "fold-bn"], verify=True)
    assert res.model is not None and {c.rule for c in res.report.changes} == {"fuse-hardswish", "fold-bn"}
    return res.model


def test_the_exact_prepasses_work_inside_if_branches():
    """fuse-hardswish then fold-bn (optimize's pre-passes) on a conv in an If's then-branch: both apply there,
    the else-branch and the outputs stay as they were."""
    then_nodes, inits = _bn_hardswish_nodes("t_", np.float32)
    shape = [1, 8, 10, 10]
    then = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, shape)])
    other = helper.make_graph([helper.make_node("Conv", ["x", "t_w"], ["e_y"], name="e_conv", pads=[1, 1, 1, 1])],
                              "else", [], [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, shape)])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10]),
                                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = _exact_prepasses(model)
    branches = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Conv", "HardSwish"]
    assert [n.op_type for n in branches["else_branch"].node] == ["Conv"]
    for cond in (True, False):
        assert_same(model, out, {"x": random_x([1, 3, 10, 10]) * 3, "cond": np.array(cond)})


def test_the_exact_prepasses_work_in_fp16():
    nodes, inits = _bn_hardswish_nodes("", np.float16)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 10, 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = _exact_prepasses(model)
    assert op_types(out) == ["Conv", "HardSwish"] and out.graph.initializer[0].data_type == TensorProto.FLOAT16
    assert_same(model, out, {"x": random_x([1, 3, 10, 10], dtype=np.float16) * 3}, tol=5e-3)  # fp16 rounding


def _softmax_conv(opset: int, *, axis: int = 1, bias: bool = True, kernel: int = 1, extra_reader: bool = False
                  ) -> onnx.ModelProto:
    """x [1,16,4,8] → Softmax(axis) → 1×1 conv 16→2 (the DFL's weights 0…15 and a second row) → y."""
    w = np.stack([np.arange(16), np.linspace(-1, 1, 16)]).astype(np.float32).reshape(2, 16, 1, 1)
    if kernel > 1:
        w = (np.repeat(np.repeat(w, kernel, 2), kernel, 3) / kernel ** 2).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(np.array([0.5, -2.0], np.float32), "b")]
                                                 if bias else [])
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="softmax", axis=axis),
             helper.make_node("Conv", ["s", "w"] + (["b"] if bias else []), ["y"], name="dfl",
                              pads=[kernel // 2] * 4)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["s"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16, 4, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 8])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, bias", [(13, True), (17, False), (18, True)])
def test_softmax_conv_divides_the_conv_of_the_exponentials_by_their_sum(opset, bias):
    """YOLOv8's DFL in small: the conv over a channel softmax becomes exp(x − max), the conv and a division by the
    sum (ReduceMax's axes an attribute before opset 18, an input from 18), the bias added after it."""
    model = _softmax_conv(opset, bias=bias)
    out, reps, _ = rewrite_with(model, "softmax-conv")
    assert len(reps) == 1 and sorted(reps[0].removed) == ["dfl", "softmax"]
    assert op_types(out) == ["ReduceMax", "Sub", "Exp", "Conv", "ReduceSum", "Div"] + (["Add"] if bias else [])
    assert_same(model, out, {"x": random_x([1, 16, 4, 8]) * 20})  # large logits: the max keeps exp finite


@pytest.mark.parametrize("model, reason", [
    (_softmax_conv(12), "Softmax before opset 13"),
    (_softmax_conv(17, axis=-1), "not over the conv's channels"),
    (_softmax_conv(17, kernel=3), "not a pointwise conv"),
    (_softmax_conv(17, extra_reader=True), "read by more than the conv"),
])
def test_softmax_conv_refuses_what_is_not_a_channel_softmax_read_by_a_pointwise_conv_alone(model, reason):
    res = rewrite(model, ["softmax-conv"], verify=False)
    assert not res.report.changes and reason in res.report.explain[0].reason


def _split_conv(opset: int, *, act: str = "silu", sizes: tuple[int, ...] = (4, 4), group: int = 1, axis: int = 1,
                unread: bool = False, sizes_as: str = "auto", scale: bool = False, extra: bool = False
                ) -> onnx.ModelProto:
    """x [1,4,6,6] → 3×3 conv 4→sum(sizes) (group) → activation ("silu", "relu" or "") → Split(axis) → each part
    through a Relu to its own output (with ``unread``, the last part read by nothing; with ``extra``, the Split's
    input read by one more Relu). ``sizes_as``: "input"
    (opset ≥ 13), "attr" (before 13), "num_outputs" (18), "none" (equal parts) or "auto" (as the opset wants)."""
    c = sum(sizes)
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((c, 4 // group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="cv1", pads=[1] * 4, group=group)]
    t = "y"
    if scale:
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32), "s"))
        nodes.append(helper.make_node("Mul", [t, "s"], ["ys"], name="scale"))
        t = "ys"
    if act == "silu":
        nodes += [helper.make_node("Sigmoid", [t], ["g"], name="sig"), helper.make_node("Mul", [t, "g"], ["a"], name="mul")]
        t = "a"
    elif act == "relu":
        nodes.append(helper.make_node("Relu", [t], ["a"], name="relu"))
        t = "a"
    if sizes_as == "auto":
        sizes_as = "input" if opset >= 13 else "attr"
    parts = [f"p{k}" for k in range(len(sizes))]
    kw: dict = {"axis": axis}
    split_in = [t]
    if sizes_as == "input":
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        split_in.append("sizes")
    elif sizes_as == "attr":
        kw["split"] = list(sizes)
    elif sizes_as == "num_outputs":
        kw["num_outputs"] = len(sizes)
    nodes.append(helper.make_node("Split", split_in, parts, name="split", **kw))
    read = parts[:-1] if unread else parts
    nodes += [helper.make_node("Relu", [p], [f"z{p}"], name=f"r{p}") for p in read]
    shape = (lambda k: [1, sizes[k], 6, 6]) if axis == 1 else (lambda k: [1, c, sizes[k], 6])
    outs = [helper.make_tensor_value_info(f"z{p}", TensorProto.FLOAT, shape(k)) for k, p in enumerate(read)]
    if extra:  # a second reader of what the Split reads
        nodes.append(helper.make_node("Relu", [t], ["e"], name="extra"))
        outs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, c, 6, 6]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])], outs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, act, sizes, sizes_as", [
    (17, "silu", (4, 4), "input"),  # YOLOv8's C2f cv1
    (11, "relu", (2, 6), "attr"),
    (13, "", (3, 3, 3), "none"),
    (18, "silu", (4, 4, 2), "num_outputs"),  # ceil(10 / 3) = 4: parts 4, 4, 2
])
def test_split_conv_gives_each_part_its_own_conv_and_activation(opset, act, sizes, sizes_as):
    model = _split_conv(opset, act=act, sizes=sizes, sizes_as=sizes_as)
    out, reps, _ = rewrite_with(model, "split-conv")
    assert len(reps) == 1 and "Split" not in op_types(out)
    assert op_types(out).count("Conv") == len(sizes)
    assert sorted(reps[0].removed) == sorted(["cv1", "split"] + {"silu": ["sig", "mul"], "relu": ["relu"]}.get(act, []))
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert [inits[c.input[1]].shape[0] for c in convs] == list(sizes)
    assert assert_same(model, out, {"x": random_x([1, 4, 6, 6])}) == 0.0  # the same sums: bit for bit


def test_split_conv_leaves_out_the_part_nothing_reads():
    model = _split_conv(17, sizes=(4, 2), unread=True)
    out, (rep,), _ = rewrite_with(model, "split-conv")
    assert op_types(out).count("Conv") == 1 and rep.macs_after == 4 * 6 * 6 * 4 * 9
    assert_same(model, out, {"x": random_x([1, 4, 6, 6])})


@pytest.mark.parametrize("model, reason", [
    (_split_conv(17, group=2), "group 2"),
    (_split_conv(17, axis=2, sizes=(3, 3)), "not over the channels"),
    (_split_conv(17, scale=True), "fold-bn first"),
    (_split_conv(17, extra=True), "not read by a Split alone"),
])
def test_split_conv_refuses_what_it_cannot_split_exactly(model, reason):
    res = rewrite(model, ["split-conv"], verify=False)
    assert not res.report.changes and reason in res.report.explain[0].reason



def test_split_conv_in_fp16_and_inside_an_if_branch():
    """An fp16 model: the parts keep the weights' type; the same conv and Split inside an If's then-branch are
    split there too, and both branches still compute what they did."""
    model = _split_conv(17, sizes=(4, 4))
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in half.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*half.graph.input, *half.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    out, reps, _ = rewrite_with(half, "split-conv")
    assert len(reps) == 1 and all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer
                                  if t.name.endswith(("_W", "_B")))
    assert_same(half, out, {"x": random_x([1, 4, 6, 6], dtype=np.float16)}, tol=5e-3)

    body = model.graph
    branch = helper.make_graph(list(body.node), "then", [], list(body.output), list(body.initializer))
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["o0"]), helper.make_node("Neg", ["x"], ["o1"])],
                              "else", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 4, 6, 6])
                                           for o in ("o0", "o1")])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["zp0", "zp1"], then_branch=branch, else_branch=other,
                                            name="if")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("zp0", TensorProto.FLOAT, [1, 4, 6, 6]),
                           helper.make_tensor_value_info("zp1", TensorProto.FLOAT, [1, 4, 6, 6])])
    iffy = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = rewrite(iffy, ["split-conv"], verify=True)
    assert res.model is not None and [c.rule for c in res.report.changes] == ["split-conv"]
    then = next(a.g for a in res.model.graph.node[0].attribute if a.name == "then_branch")
    assert "Split" not in [n.op_type for n in then.node]
    for cond in (True, False):
        assert_same(iffy, res.model, {"x": random_x([1, 4, 6, 6]), "cond": np.array(cond)})
