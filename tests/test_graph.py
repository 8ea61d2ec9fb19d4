"""ConvGraph: lossless ONNX ⇄ networkx view, subgraphs, edits, >2 GB saving and shapes."""

from __future__ import annotations

import os
import re
import warnings
import zlib
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
import convgraph.io
from convgraph import ConvGraphWarning, ModelError, UsageError
from convgraph.model.graph import free_names
from convgraph.model.weights import constant_value

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> TensorProto:
    """A random weight, the same for the same name and shape."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _vi(name: str, shape, elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, **kw) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), **{k: v for k, v in kw.items() if k in (
        "value_info", "sparse_initializer", "doc_string")})
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] + kw.get("extra_opsets", []))
    m.ir_version = kw.get("ir_version", 8)
    return m


def _load(source, input_shapes=None, **kw) -> convgraph.ConvGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvGraphWarning)
        return convgraph.load(source, input_shapes, **kw)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _inline(m: onnx.ModelProto) -> bytes:
    """``m`` serialized without the ``data_location: DEFAULT`` that onnx.load leaves on tensors it read in."""
    c = onnx.ModelProto()
    c.CopyFrom(m)
    for t in convgraph.io.iter_tensors(c):
        if t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")
    return c.SerializeToString()


def _chain(n: int = 3, c: int = 4) -> onnx.ModelProto:
    """x → conv0 → relu0 → conv1 → relu1 ... → y (every conv 3×3 pads 1, its own weight)."""
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(_w(f"w{i}", c, c, 3, 3))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        out = "y" if i == n - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))
        prev = out
    return _model(nodes, [_vi("x", [1, c, 8, 8])], [_vi("y", [1, c, 8, 8])], inits)


# ---- lossless ---------------------------------------------------------------------------------
def _kitchen_sink() -> onnx.ModelProto:
    """Every part of a ModelProto that is not a plain node: all must survive load → to_model."""
    attrs = helper.make_node(
        "Conv", ["x", "w", "b"], ["c"], name="conv", doc_string="the conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
        strides=[1, 1], dilations=[1, 1], group=1, auto_pad="NOTSET")
    const = helper.make_node("Constant", [], ["k"], name="const", value=numpy_helper.from_array(np.float32(2.0)))
    mul = helper.make_node("Mul", ["c", "k"], ["m"], name="mul")
    fn_call = helper.make_node("Twice", ["m"], ["t"], name="fn", domain="local")
    lrn = helper.make_node("LeakyRelu", ["t"], ["y"], name="leaky", alpha=0.25)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp"), numpy_helper.from_array(np.array([1, 5], np.int64), "sp_i"), [8])
    typed = helper.make_tensor("b", F, [4], [0.5, -0.5, 0.25, 0.0])  # typed float_data, not raw
    raw = _w("w", 4, 3, 3, 3)  # raw_data
    ints = helper.make_tensor("unused_i64", TensorProto.INT64, [2], [7, 8])  # typed int64_data
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)], doc_string="a + a")
    g = helper.make_graph(
        [attrs, const, mul, fn_call, lrn], "sink", [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])],
        [raw, typed, ints], doc_string="graph doc", value_info=[_vi("c", [1, 4, 8, 8])], sparse_initializer=[sparse])
    g.input[0].doc_string = "the input"
    qa = g.quantization_annotation.add()
    qa.tensor_name = "c"
    qa.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="k")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[fn], producer_name="tests", producer_version="1.0", doc_string="model doc",
                          model_version=7, domain="org.convgraph.test")
    m.ir_version = 9
    helper.set_model_props(m, {"author": "convgraph", "purpose": "round trip"})
    return m


def test_kitchen_sink_is_byte_identical_and_runs_the_same() -> None:
    m = _kitchen_sink()
    onnx.checker.check_model(m, full_check=True)
    cg = _load(m)
    out = cg.to_model()
    assert _bytes(out) == _bytes(m)
    onnx.checker.check_model(out, full_check=True)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    a, b = _run(m, {"x": x}), _run(out, {"x": x})
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_kitchen_sink_view() -> None:
    m = _kitchen_sink()
    cg = _load(m)
    G = cg.graph
    kinds = nx.utils.groups({n: d["kind"] for n, d in G.nodes(data=True)})
    assert kinds["op"] == {"conv", "const", "mul", "fn", "leaky"}  # one node per ONNX node
    assert kinds["input"] == {"input:x"}
    assert kinds["initializer"] == {"initializer:w", "initializer:b", "initializer:unused_i64"}
    assert kinds["sparse_initializer"] == {"sparse_initializer:sp"}
    assert kinds["output"] == {"output:y"}
    assert list(cg.ops()) == ["conv", "const", "mul", "fn", "leaky"]  # model order
    conv = G.nodes["conv"]
    assert conv["attrs"] == {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1], "dilations": [1, 1],
                             "group": 1, "auto_pad": b"NOTSET"}
    assert G.nodes["fn"]["domain"] == "local" and G.nodes["leaky"]["attrs"] == {"alpha": 0.25}
    # one edge per (tensor, consumer slot), producer → consumer, with the tensor's info
    edges = {(u, v, k) for u, v, k in G.edges(keys=True)}
    assert edges == {
        ("input:x", "conv", ("x", 0)), ("initializer:w", "conv", ("w", 1)), ("initializer:b", "conv", ("b", 2)),
        ("conv", "mul", ("c", 0)), ("const", "mul", ("k", 1)), ("mul", "fn", ("m", 0)), ("fn", "leaky", ("t", 0)),
        ("leaky", "output:y", ("y", 0))}
    assert G.edges["conv", "mul", ("c", 0)]["info"] == convgraph.TensorInfo(F, (1, 4, 8, 8))
    assert cg.producer("c") == "conv" and cg.consumers("c") == ["mul"] and cg.consumers("nothing") == []
    assert cg.initializer("w") is not None and cg.initializer("c") is None
    assert cg.shape("sp") == (8,) and cg.shape("unused_i64") == (2,) and cg.shape("k") == ()


def test_external_data_round_trip(tmp_path) -> None:
    m = _chain(2)
    path = tmp_path / "ext.onnx"
    onnx.save_model(_chain(2), path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
                    size_threshold=0)
    assert (tmp_path / "ext.bin").exists()
    stored = onnx.load(path, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    cg = _load(path)
    assert cg.source_dir == tmp_path.resolve()
    out = cg.to_model()
    assert _bytes(out) == _bytes(onnx.load(path))  # data read in, exactly as onnx.load does
    assert _inline(out) == _bytes(m)
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(_run(m, {"x": x})[0], _run(out, {"x": x})[0])


def test_model_proto_source_is_copied_not_aliased() -> None:
    m = _chain(1)
    cg = _load(m)
    m.graph.node[0].name = "changed"
    m.graph.initializer[0].dims[0] = 99
    w0 = cg.initializer("w0")
    assert cg.node("conv0").name == "conv0" and w0 is not None and w0.dims[0] == 4


def test_bytes_source_and_unnamed_or_duplicate_node_names() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Relu", ["b"], ["c"], name="r"), helper.make_node("Relu", ["c"], ["y"], name="r")]
    m = _model(nodes, [_vi("x", [2])], [_vi("y", [2])])
    cg = _load(_bytes(m))
    assert list(cg.ops()) == ["Relu_0", "r", "r_1", "r_2"]
    assert _bytes(cg.to_model()) == _bytes(m)  # the names in the model stay as they were


# ---- subgraphs --------------------------------------------------------------------------------
def _control_flow() -> onnx.ModelProto:
    """Convs inside If (both branches), Loop (with an If nested in its body) and Scan bodies.

    Bodies read main-graph tensors (``h``, ``w_main``) and a Loop-body tensor is read by the nested If.
    """
    w_then, w_else, w_loop, w_nest, w_scan = (_w(n, 4, 4, 3, 3) for n in ("w_then", "w_else", "w_loop", "w_nest", "w_scan"))
    w_scan = _w("w_scan", 4, 4, 3)
    then_g = helper.make_graph([helper.make_node("Conv", ["h", "w_then"], ["t_out"], name="then_conv", pads=[1] * 4)],
                               "then", [], [_vi("t_out", [1, 4, 8, 8])], [w_then])
    else_g = helper.make_graph([helper.make_node("Conv", ["h", "w_else"], ["e_out"], name="else_conv", pads=[1] * 4)],
                               "else", [], [_vi("e_out", [1, 4, 8, 8])], [w_else])
    nest_g = helper.make_graph([helper.make_node("Conv", ["lc", "w_main"], ["n_out"], name="nest_conv", pads=[1] * 4)],
                               "nest", [], [_vi("n_out", [1, 4, 8, 8])])
    nest_else = helper.make_graph([helper.make_node("Identity", ["lc"], ["ne_out"], name="nest_id")],
                                  "nest_else", [], [_vi("ne_out", [1, 4, 8, 8])])
    loop_body = helper.make_graph(
        [helper.make_node("Conv", ["state", "w_loop"], ["lc"], name="loop_conv", pads=[1] * 4),
         helper.make_node("If", ["flag"], ["ln"], name="nested_if", then_branch=nest_g, else_branch=nest_else),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "loop", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("state", [1, 4, 8, 8])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("ln", [1, 4, 8, 8])], [w_loop])
    scan_body = helper.make_graph(
        [helper.make_node("Conv", ["s_in", "w_scan"], ["s_out"], name="scan_conv", pads=[1, 1])],
        "scan", [_vi("s_in", [1, 4, 8])], [_vi("s_out", [1, 4, 8])], [w_scan])
    nodes = [
        helper.make_node("Conv", ["x", "w_main"], ["h"], name="main_conv", pads=[1] * 4),
        helper.make_node("If", ["flag"], ["if_out"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "", "if_out"], ["loop_out"], name="loop", body=loop_body),
        helper.make_node("Scan", ["seq"], ["scan_out"], name="scan", body=scan_body, num_scan_inputs=1),
    ]
    return _model(
        nodes, [_vi("x", [1, 4, 8, 8]), _vi("flag", [], TensorProto.BOOL), _vi("seq", [2, 1, 4, 8])],
        [_vi("loop_out", [1, 4, 8, 8]), _vi("scan_out", [2, 1, 4, 8])],
        [_w("w_main", 4, 4, 3, 3), numpy_helper.from_array(np.array(2, np.int64), "trips")])


def _cf_feeds(flag: bool = True) -> dict:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "flag": np.array(flag),
            "seq": rng.standard_normal((2, 1, 4, 8)).astype(np.float32)}


def test_subgraph_convs_are_reachable_with_shapes() -> None:
    m = _control_flow()
    onnx.checker.check_model(m, full_check=True)
    cg = _load(m)
    assert _bytes(cg.to_model()) == _bytes(m)
    convs = {(g.path, nid) for g in cg.walk() for nid in g.ops({"Conv"})}
    assert convs == {("", "main_conv"), ("/if:then_branch", "then_conv"), ("/if:else_branch", "else_conv"),
                     ("/loop:body", "loop_conv"), ("/loop:body/nested_if:then_branch", "nest_conv"),
                     ("/scan:body", "scan_conv")}
    for g in cg.walk():
        for nid in g.ops({"Conv"}):
            info = g.shape_info(g.node(nid).output[0])
            assert info is not None and info.static, (g.path, nid)  # shapes inside every body
            assert g.shape(g.node(nid).input[1]) is not None  # outer weights resolve through the parents
    loop_body = cg.graph.nodes["loop"]["subgraphs"]["body"]
    nest = loop_body.graph.nodes["nested_if"]["subgraphs"]["then_branch"]
    assert nest.parent is loop_body and nest.owner == "nested_if" and loop_body.owner == "loop"
    assert nest.outer_refs() == {"lc", "w_main"} and loop_body.outer_refs() == {"w_main", "flag"}
    assert nest.shape("w_main") == (4, 4, 3, 3) and nest.shape("lc") == (1, 4, 8, 8)


def test_outer_scope_captures_are_implicit_edges() -> None:
    cg = _load(_control_flow())
    G = cg.graph
    implicit = {(u, v, k[0]) for u, v, k, d in G.edges(keys=True, data=True) if d.get("implicit")}
    # h feeds the If bodies; w_main feeds the Loop through its nested If; flag too
    assert implicit == {("main_conv", "if", "h"), ("initializer:w_main", "loop", "w_main"), ("input:flag", "loop", "flag")}
    assert all(G.edges[e]["index"] == -1 for e in G.edges(keys=True) if G.edges[e].get("implicit"))
    assert set(cg.consumers("h")) == {"if"}
    body = G.nodes["loop"]["subgraphs"]["body"].graph
    assert body.nodes["outer:w_main"]["kind"] == "outer" and ("outer:w_main", "nested_if", ("w_main", -1)) in body.edges
    assert free_names(_control_flow().graph.node[2].attribute[0].g) == {"w_main", "flag"}


def test_edit_inside_subgraph_shows_in_parent_model() -> None:
    m = _control_flow()
    cg = _load(m)
    then = cg.graph.nodes["if"]["subgraphs"]["then_branch"]
    conv = then.node("then_conv")
    new_conv = helper.make_node("Conv", list(conv.input), ["t_pre"], name="then_conv2", pads=[1] * 4)
    relu = helper.make_node("Relu", ["t_pre"], ["t_out"], name="then_relu")
    assert then.replace(["then_conv"], [new_conv, relu]) == ["then_conv2", "then_relu"]
    assert then.dirty and cg.dirty
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    body = next(a.g for a in out.graph.node[1].attribute if a.name == "then_branch")
    assert [n.name for n in body.node] == ["then_conv2", "then_relu"]
    a, b = _run(m, _cf_feeds()), _run(out, _cf_feeds())
    ref_then = np.maximum(_run(_only_if_then(m), _cf_feeds())[0], 0)
    assert not np.array_equal(a[0], b[0])
    assert np.array_equal(_run(_only_if_then(out), _cf_feeds())[0], ref_then)
    assert np.array_equal(a[1], b[1])  # the Scan is untouched
    assert _bytes(cg.model) == _bytes(m)  # the loaded model itself is never edited


def _only_if_then(m: onnx.ModelProto) -> onnx.ModelProto:
    """``m`` with the If's output as the graph output (to look at the branch alone)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.output[:]
    out.graph.output.append(_vi("if_out", [1, 4, 8, 8]))
    return out


def test_subgraph_edit_that_captures_a_new_outer_tensor() -> None:
    m = _control_flow()
    cg = _load(m)
    scan = cg.graph.nodes["scan"]["subgraphs"]["body"]
    assert scan.outer_refs() == set()
    # the scan body now adds a main-graph tensor (made by main_conv, i.e. before the Scan)
    mean = helper.make_node("ReduceMean", ["h"], ["hm"], name="hm", keepdims=0)
    conv = helper.make_node("Conv", ["s_in", "w_scan"], ["s_c"], name="scan_conv2", pads=[1, 1])
    add = helper.make_node("Add", ["s_c", "hm"], ["s_out"], name="scan_add")
    scan.replace(["scan_conv"], [mean, conv, add])
    assert scan.outer_refs() == {"h"}
    assert ("main_conv", "scan", ("h", -1)) in cg.graph.edges
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    feeds = _cf_feeds()
    h = _run(_expose(m, "h"), feeds)[-1]
    assert np.allclose(_run(out, feeds)[1], _run(m, feeds)[1] + h.mean(), atol=1e-5)
    # undo the capture: the implicit edge and the outer node go again
    scan.replace(["hm", "scan_conv2", "scan_add"], [helper.make_node("Conv", ["s_in", "w_scan"], ["s_out"], pads=[1, 1])])
    assert scan.outer_refs() == set() and "outer:h" not in scan.graph
    assert not [e for e in cg.graph.in_edges("scan", keys=True) if e[2][1] == -1]
    assert np.array_equal(_run(cg.to_model(), feeds)[1], _run(m, feeds)[1])


def _expose(m: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    return out


def test_nested_capture_propagates_through_every_level() -> None:
    cg = _load(_control_flow())
    loop = cg.graph.nodes["loop"]["subgraphs"]["body"]
    nest = loop.graph.nodes["nested_if"]["subgraphs"]["then_branch"]
    # the nested branch now also reads x (main graph): the Loop body and the Loop get implicit edges
    add = helper.make_node("Add", ["lc", "x"], ["lx"], name="nest_add")
    conv = helper.make_node("Conv", ["lx", "w_main"], ["n_out"], name="nest_conv", pads=[1] * 4)
    nest.replace(["nest_conv"], [add, conv])
    assert "x" in nest.outer_refs() and "x" in loop.outer_refs()
    assert ("outer:x", "nested_if", ("x", -1)) in loop.graph.edges
    assert ("input:x", "loop", ("x", -1)) in cg.graph.edges
    onnx.checker.check_model(cg.to_model(), full_check=True)
    _run(cg.to_model(), _cf_feeds())


def test_subgraph_capture_cannot_close_a_cycle() -> None:
    cg = _load(_control_flow())
    before = _bytes(cg.to_model())
    then = cg.graph.nodes["if"]["subgraphs"]["then_branch"]
    # loop_out is made by the Loop, which reads if_out: the If reading it would be a cycle
    bad = helper.make_node("Conv", ["loop_out", "w_then"], ["t_out"], name="bad", pads=[1] * 4)
    with pytest.raises(ModelError, match="cycle"):
        then.replace(["then_conv"], [bad])
    assert _bytes(cg.to_model()) == before


# ---- replace ----------------------------------------------------------------------------------
def _is_topological(model: onnx.ModelProto) -> bool:
    seen = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for n in model.graph.node:
        if not all(i in seen for i in n.input):
            return False
        seen.update(n.output)
    return True


def test_replace_keeps_the_graph_valid_and_in_place() -> None:
    m = _chain(3)
    cg = _load(m)
    w = _w("w1_new", 4, 4, 1, 1)
    new = helper.make_node("Conv", ["r0", "w1_new"], ["c1"], name="conv1_1x1")
    assert cg.replace(["conv1"], [new], [w]) == ["conv1_1x1"]
    assert list(cg.ops()) == ["conv0", "relu0", "conv1_1x1", "relu1", "conv2", "relu2"]
    assert cg.producer("c1") == "conv1_1x1" and cg.consumers("c1") == ["relu1"]
    assert cg.initializer("w1_new") is w
    assert cg.prune_initializers() == ["w1"]
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    assert [t.name for t in out.graph.initializer] == ["w0", "w2", "w1_new"]
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    _run(out, {"x": x})


def test_replace_reading_a_later_tensor_reorders() -> None:
    # x → a → b → y1 ;  x → p → q → y2 ; replace a by a node that also reads q (made later in the order)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["y1"], name="b"),
             helper.make_node("Sigmoid", ["x"], ["p"], name="p"), helper.make_node("Abs", ["p"], ["q"], name="q"),
             helper.make_node("Identity", ["q"], ["y2"], name="r")]
    m = _model(nodes, [_vi("x", [3])], [_vi("y1", [3]), _vi("y2", [3])])
    cg = _load(m)
    cg.replace(["a"], [helper.make_node("Add", ["x", "q"], ["a"], name="a2")])
    order = list(cg.ops())
    assert order.index("a2") > order.index("q") and order.index("b") > order.index("a2")
    out = cg.to_model()
    assert _is_topological(out)
    onnx.checker.check_model(out, full_check=True)
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    y1, y2 = _run(out, {"x": x})
    assert np.allclose(y1, -(x + np.abs(1 / (1 + np.exp(-x)))))


@pytest.mark.parametrize("case, error", [
    ("cycle", ModelError), ("drops", ModelError), ("twice", ModelError), ("exists", ModelError),
    ("missing", ModelError), ("reads-removed", ModelError), ("empty", UsageError), ("not-op", UsageError),
])
def test_replace_refuses_and_leaves_the_graph_alone(case: str, error: type) -> None:
    cg = _load(_chain(3))
    before = _bytes(cg.to_model())
    conv = lambda i, o, name="n": helper.make_node("Conv", [i, "w1"], [o], name=name, pads=[1] * 4)  # noqa: E731
    args = {
        "cycle": (["conv1"], [conv("r1", "c1")]),  # reads relu1's output, which reads c1
        "drops": (["conv1"], [conv("r0", "c1_other")]),  # relu1 still reads c1
        "twice": (["conv1"], [conv("r0", "c1", "n1"), conv("r0", "c1", "n2")]),
        "exists": (["conv1"], [conv("r0", "c1"), conv("r0", "c2", "n2")]),  # conv2 makes c2
        "missing": (["conv1"], [conv("nowhere", "c1")]),
        "reads-removed": (["conv1", "relu1"], [conv("c1", "r1")]),
        "empty": ([], [conv("r0", "c1")]),
        "not-op": (["initializer:w1"], []),
    }[case]
    with pytest.raises(error):
        cg.replace(*args)
    assert _bytes(cg.to_model()) == before
    assert not cg.dirty


def test_replace_can_delete_and_rewire_graph_outputs() -> None:
    cg = _load(_chain(2))
    cg.replace(["relu1"], [helper.make_node("Sigmoid", ["c1"], ["y"], name="sig")])
    assert cg.consumers("y") == ["output:y"]
    cg.replace(["sig"], [helper.make_node("Identity", ["c1"], ["y"], name="id")])
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    assert [n.name for n in out.graph.node][-1] == "id"
    with pytest.raises(ModelError, match="still read"):
        cg.replace(["id"], [])


def test_unique_tensor_is_fresh_across_scopes() -> None:
    cg = _load(_control_flow())
    then = cg.graph.nodes["if"]["subgraphs"]["then_branch"]
    assert then.unique_tensor("h") == "h_1"  # h lives in the main graph
    assert cg.unique_tensor("t_out") == "t_out_1"  # t_out lives in a body
    assert cg.unique_tensor("h") == "h_2" and cg.unique_tensor("fresh") == "fresh"


def test_ir3_initializers_listed_as_inputs() -> None:
    """Old models list every initializer as a graph input too: the initializer makes the tensor."""
    m = _chain(2)
    m.ir_version = 3
    m.opset_import[0].version = 9
    m.graph.input.extend(_vi(t.name, list(t.dims)) for t in m.graph.initializer)
    cg = _load(m)
    assert _bytes(cg.to_model()) == _bytes(m)
    assert cg.producer("w0") == "initializer:w0" and cg.consumers("w0") == ["conv0"]
    assert cg.graph.out_degree("input:w0") == 0
    cg.replace(["conv0"], [helper.make_node("Conv", ["x", "w1"], ["c0"], name="conv0b", pads=[1] * 4)])
    assert cg.prune_initializers() == ["w0"]
    out = cg.to_model()
    assert [v.name for v in out.graph.input] == ["x", "w1"]  # the override input went with its initializer
    onnx.checker.check_model(out, full_check=True)
    _run(out, {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)})


# ---- >2 GB ------------------------------------------------------------------------------------
def test_models_over_the_protobuf_limit_save_with_external_data(tmp_path, monkeypatch) -> None:
    m = _chain(3, c=8)  # weights of 2.3 kB each: above the 1 kB that goes to external data
    cg = _load(m)
    monkeypatch.setattr(convgraph.io, "PROTOBUF_LIMIT", 4000)  # the chain (~7 kB) counts as "over 2 GB"
    assert m.ByteSize() > convgraph.io.PROTOBUF_LIMIT
    out = tmp_path / "big.onnx"
    assert convgraph.save(cg, out) == out
    stored = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    (data,) = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert re.fullmatch(r"big\.onnx\.[0-9a-f]{16}\.data", data)  # named after its content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", data]  # no temp left
    assert _inline(onnx.load(out)) == _bytes(m)
    # and it loads back: checked from its file, shapes inferred from the model without its data
    back = _load(out)
    assert _inline(back.to_model()) == _bytes(m)
    assert back.shape("c1") == (1, 8, 8, 8) and not back.warnings
    monkeypatch.undo()
    x = RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)
    assert np.array_equal(_run(back.to_model(), {"x": x})[0], _run(m, {"x": x})[0])


def test_rewriting_a_big_model_switches_model_and_data_in_one_rename(tmp_path, monkeypatch) -> None:
    """Saving over a >2 GB model: the new data file gets a new name, so until the model file's rename the
    old model still reads its own data; then the old data file (ours) goes, a user's file stays."""
    monkeypatch.setattr(convgraph.io, "PROTOBUF_LIMIT", 4000)
    out = tmp_path / "big.onnx"
    (tmp_path / "big.onnx.data").write_bytes(b"a user's file of that name")
    convgraph.save(_load(_chain(3, c=8)), out)
    first = {p.name for p in tmp_path.iterdir()}
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # at the model file's rename, the old model must still load whole
        if Path(dst) == out:
            seen.append(_inline(onnx.load(out)) == _bytes(_chain(3, c=8)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    other = _chain(3, c=8)
    for t in other.graph.initializer:
        t.raw_data = (np.frombuffer(t.raw_data, np.float32) * 2).astype(np.float32).tobytes()
    convgraph.save(_load(other), out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen == [True]
    after = {p.name for p in tmp_path.iterdir()}
    assert "big.onnx.data" in after and len(after) == 3 and after != first  # old data gone, user file kept
    assert _inline(onnx.load(out)) == _bytes(other)
    convgraph.save(_load(other), out)  # the same content again: the same data file, nothing removed
    assert {p.name for p in tmp_path.iterdir()} == after


def test_big_files_are_read_with_their_weights_in_memory_once(tmp_path, monkeypatch) -> None:
    """A model file over SPLIT_BYTES is parsed without its big tensors' bytes, which are then read into their
    tensors (as external data in the model file itself): the same model, checked and inferred without them."""
    m = _chain(3, c=8)  # weights of 2.3 kB each
    m.graph.initializer[0].doc_string = "fields after raw_data are kept"
    path = tmp_path / "big.onnx"
    path.write_bytes(m.SerializeToString())
    os.link(path, tmp_path / "other-name.onnx")  # the model file itself may have other names
    monkeypatch.setattr(convgraph.io, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(convgraph.io, "LAZY_BYTES", 1000)
    seen = []
    real = onnx.checker.check_model

    def check(model, **kw):
        seen.append(model)
        return real(model, **kw)

    monkeypatch.setattr(onnx.checker, "check_model", check)
    cg = _load(path)
    out = cg.to_model()  # the weights stay in the file: the model refers to them
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in out.graph.initializer)
    assert _bytes(convgraph.io.inlined(out)) == _bytes(m) and cg.shape("c1") == (1, 8, 8, 8) and not cg.warnings
    assert np.array_equal(_value(cg, "w1"), numpy_helper.to_array(m.graph.initializer[1]))
    x = RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)
    assert np.array_equal(_run(convgraph.io.inlined(out), {"x": x})[0], _run(m, {"x": x})[0])
    saved = tmp_path / "saved.onnx"
    convgraph.save(cg, saved)  # the bytes streamed from the file they stayed in
    assert _bytes(onnx.load(saved)) == _bytes(m)
    (checked,) = seen  # the checker saw the structure: the big weights as inputs, no bytes of them
    assert not checked.graph.initializer and {"w0", "w1", "w2"} <= {v.name for v in checked.graph.input}
    model, origin = convgraph.io.read_model(path)
    assert origin.skeleton is not None and _bytes(convgraph.io.inlined(model)) == _bytes(m)
    assert all(e.value == "big.onnx" for t in origin.skeleton.graph.initializer for e in t.external_data
               if e.key == "location") and origin.skeleton.ByteSize() < m.ByteSize() // 3
    path.write_bytes(m.SerializeToString()[:-40])  # cut inside the graph
    with pytest.raises(ModelError, match="truncated or corrupt"):
        _load(path)
    data, rng = m.SerializeToString(), np.random.default_rng(0)
    for i in range(60):  # damaged big files: one clear error or a model, nothing else
        bad = bytearray(data[: int(rng.integers(1, len(data)))] if i % 2 else data)
        for j in rng.integers(0, len(bad), 3):
            bad[j] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(bad))
        try:
            _load(path)
        except ModelError:
            pass


def test_weights_left_on_disk_go_through_rewrite_verify_and_save(tmp_path, monkeypatch) -> None:
    """External data that stays on disk: the rules read it, onnxruntime reads it from its file (checks, verify,
    bench), and the rewritten model is saved with it, over 2 GB too (simulated), never serialized whole."""
    from convgraph.engine.rewrite import Selection, rewrite

    m = _chain(3, c=8)
    path = tmp_path / "big.onnx"
    onnx.save(onnx.ModelProto.FromString(m.SerializeToString()), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=1000)
    monkeypatch.setattr(convgraph.io, "LAZY_BYTES", 1000)
    res = rewrite(path, ["spatial-separable"], params={"rank": "full"}, selection=Selection(nodes="conv0"),
                  bench=True, bench_runs=2)
    assert res.model is not None and res.report.verification is not None
    assert res.report.passed and res.report.changes and res.report.verification["passed"]
    assert sum(t.data_location == TensorProto.EXTERNAL for t in res.model.graph.initializer) == 2  # w1, w2 left
    x = RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)
    want = _run(m, {"x": x})[0]
    for limit in (None, 4000):  # one file; "over 2 GB": its data file written tensor by tensor
        if limit:
            monkeypatch.setattr(convgraph.io, "PROTOBUF_LIMIT", limit)
        out = tmp_path / f"out{limit}.onnx"
        convgraph.save(res.model, out)
        monkeypatch.setattr(convgraph.io, "PROTOBUF_LIMIT", 2**31 - 1)
        assert np.allclose(_run(onnx.load(out), {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    assert convgraph.verify(path, tmp_path / "outNone.onnx").passed


def _value(cg, tensor: str) -> np.ndarray:
    v = constant_value(cg, tensor)
    assert v is not None
    return v


def test_a_big_file_saved_over_in_place_reads_back_its_new_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(convgraph.io, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(convgraph.io, "LAZY_BYTES", 1000)
    path = tmp_path / "big.onnx"
    path.write_bytes(_chain(3, c=8).SerializeToString())
    cg = _load(path)
    old = _value(cg, "w1")
    other = _chain(3, c=8)
    for t in other.graph.initializer:
        t.raw_data = (np.frombuffer(t.raw_data, np.float32) * 2).astype(np.float32).tobytes()
    other_path = tmp_path / "other.onnx"
    other_path.write_bytes(other.SerializeToString())
    convgraph.save(_load(other_path), path, in_place=True)  # the file the first model's weights lie in, replaced
    assert np.array_equal(_value(_load(path), "w1"), 2 * old)


# ---- shapes -----------------------------------------------------------------------------------
def _dynamic() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [_vi("x", ["N", 3, "H", "W"])], [_vi("y", ["N", 8, "Ho", "Wo"])], [_w("w", 8, 3, 3, 3)])


def test_input_shapes_fix_dynamic_dims() -> None:
    m = _dynamic()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvGraphWarning)
        cg = convgraph.load(m, {"x": [1, 3, 32, 48]})
    assert cg.shape("c") == (1, 8, 16, 24) and cg.shape("y") == (1, 8, 16, 24)
    assert cg.input_shapes == {"x": [1, 3, 32, 48]} and cg.warnings == []
    assert _bytes(cg.to_model()) == _bytes(m)  # the model keeps its dynamic dims


def test_unset_dynamic_dims_give_one_warning_naming_input_and_flag() -> None:
    with pytest.warns(ConvGraphWarning) as record:
        cg = convgraph.load(_dynamic())
    assert len(record) == 1
    msg = str(record[0].message)
    assert "x [N,3,H,W]" in msg and "--input-shape" in msg and "x=?,3,?,?" in msg
    assert cg.warnings == [msg]
    assert (cg.shape("c") or ())[1:2] == (8,) and not convgraph.TensorInfo(F, cg.shape("c")).static
    _ = [cg.shape(t) for t in ("x", "c", "y", "w", "unknown")]  # nothing crashes on unknown dims


def test_negative_dim_value_counts_as_dynamic() -> None:
    m = _dynamic()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # how old exporters wrote "dynamic"
    with pytest.warns(ConvGraphWarning, match=r"x \[\?,3,H,W\]"):
        convgraph.load(m)
    assert _load(m, {"x": [2, 3, 8, 8]}).shape("y") == (2, 8, 4, 4)


def test_strict_inference_failure_is_a_clear_warning() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"], name="add")]
    m = _model(nodes, [_vi("a", [2, 3]), _vi("b", [4, 5])], [_vi("c", [2, 3])])
    with pytest.warns(ConvGraphWarning, match="strict shape inference failed.*Incompatible dimensions"):
        cg = convgraph.load(m)
    assert cg.shape("a") == (2, 3)


@pytest.mark.parametrize("shapes, match", [
    ({"nope": [1, 3, 8, 8]}, "not an input"),
    ({"x": [1, 3, 8]}, "has 3 dims, the model's input has 4"),
    ({"x": [1, 4, 8, 8]}, "dim 1 is fixed to 3"),
    ({"x": [1, 3, 0, 8]}, "between 1 and"),
    ({"x": [1, 3, "a b", 8]}, "between 1 and"),
    ({"x": [1.5, 3, 8, 8]}, "between 1 and"),
    ({"x": [2**40, 3, 8, 8]}, "between 1 and"),
    ({"x": []}, "has 0 dims"),
    ([1, 3, 8, 8], "must map input names"),
])
def test_bad_input_shapes_are_usage_errors(shapes, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        _load(_dynamic(), shapes)


def test_initializer_names_are_not_inputs_for_input_shapes() -> None:
    m = _chain(1)
    m.ir_version = 3
    m.opset_import[0].version = 9
    m.graph.input.extend(_vi(t.name, list(t.dims)) for t in m.graph.initializer)
    with pytest.raises(UsageError, match="not an input"):
        _load(m, {"w0": [4, 4, 3, 3]})


def test_shapes_stay_out_of_the_model() -> None:
    m = _chain(2)
    cg = _load(m)
    assert cg.shape("c0") == (1, 4, 8, 8)
    assert len(cg.to_model().graph.value_info) == 0  # inference results are not written into the model


def test_random_edits_keep_the_graph_valid_and_refuse_exactly_the_cycles() -> None:
    """Rewire a random DAG at random: each edit is refused (graph untouched) iff it would close a cycle;
    every accepted edit leaves a checker-valid, topologically sorted model."""
    rng = np.random.default_rng(7)
    n = 30
    nodes = []
    for i in range(n):
        ins = ["x"] + [f"t{j}" for j in rng.choice(i, size=min(i, int(rng.integers(1, 3))), replace=False)] if i else ["x"]
        nodes.append(helper.make_node("Sum", ins, [f"t{i}"], name=f"n{i}"))
    outputs = [_vi(f"t{i}", [3]) for i in range(n)]
    cg = _load(_model(nodes, [_vi("x", [3])], outputs))
    refused = accepted = 0
    for step in range(120):
        ops = list(cg.ops())
        victim = ops[int(rng.integers(len(ops)))]
        out = cg.node(victim).output[0]
        tensors = ["x"] + [cg.node(o).output[0] for o in ops if o != victim]
        reads = [str(t) for t in rng.choice(tensors, size=int(rng.integers(1, 4)), replace=False)]
        # ground truth: a cycle iff something read depends on the victim's output
        below = nx.descendants(cg.graph, victim)
        cycle = any(cg.producer(t) in below for t in reads)
        if rng.random() < 0.5:
            new = [helper.make_node("Sum", reads, [out], name=f"s{step}")]
        else:
            mid = cg.unique_tensor(f"m{step}")
            new = [helper.make_node("Sum", reads, [mid], name=f"s{step}"), helper.make_node("Relu", [mid], [out], name=f"r{step}")]
        before = _bytes(cg.to_model())
        if cycle:
            with pytest.raises(ModelError, match="cycle"):
                cg.replace([victim], new)
            assert _bytes(cg.to_model()) == before
            refused += 1
        else:
            cg.replace([victim], new)
            m = cg.to_model()
            assert _is_topological(m), step
            assert [cg.node(o).name for o in cg.topological_order()] == [nd.name for nd in m.graph.node]
            accepted += 1
    onnx.checker.check_model(cg.to_model(), full_check=True)
    _run(cg.to_model(), {"x": np.array([1.0, -2.0, 3.0], np.float32)})
    assert refused > 10 and accepted > 10


def test_subgraph_views_give_graphs_not_models() -> None:
    cg = _load(_control_flow())
    then = cg.graph.nodes["if"]["subgraphs"]["then_branch"]
    with pytest.raises(UsageError, match="to_model\\(\\) is for the main graph"):
        then.to_model()
    body = next(a.g for a in _control_flow().graph.node[1].attribute if a.name == "then_branch")
    assert then.to_graph().SerializeToString() == body.SerializeToString()
    # depth first, in node order, bodies in attribute order (make_node sorts them: else before then)
    assert [g.path for g in cg.walk()] == ["", "/if:else_branch", "/if:then_branch", "/loop:body",
                                           "/loop:body/nested_if:else_branch", "/loop:body/nested_if:then_branch",
                                           "/scan:body"]


def test_prune_keeps_initializers_that_bodies_read() -> None:
    cg = _load(_control_flow())
    # main_conv goes; w_main is still read by the Loop's nested If, so it stays
    cg.replace(["main_conv"], [helper.make_node("Relu", ["x"], ["h"], name="main_relu")])
    assert cg.prune_initializers() == []
    assert cg.initializer("w_main") is not None
    onnx.checker.check_model(cg.to_model(), full_check=True)


def test_check_false_skips_the_checker_only() -> None:
    m = _chain(1)
    m.graph.node.append(helper.make_node("NotAnOp", ["y"], ["z"], name="bogus"))
    m.graph.output.append(_vi("z", [1, 4, 8, 8]))
    with pytest.raises(ModelError, match="fails onnx.checker"):
        _load(m)
    cg = _load(m, check=False)
    assert cg.graph.nodes["bogus"]["op_type"] == "NotAnOp"
    assert cg.shape("c0") == (1, 4, 8, 8)


def test_gc_paused_restores_and_leaves_the_new_objects_old_but_collectable() -> None:
    import gc

    from convgraph.model.graph import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: only the outermost restores
            pass
        assert not gc.isenabled()
        made: list[list] = [[] for _ in range(1000)]
        assert gc.is_tracked(made[0])
    assert gc.isenabled() and gc.get_freeze_count() == 0  # nothing left frozen
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert id(made) in oldest and id(made[-1]) in oldest  # not left for the young generations to scan
    cycle: list = [made]
    cycle.append(cycle)
    del made, cycle
    assert gc.collect() > 0  # a cycle made during the pause is still collected


def test_gc_paused_keeps_what_the_application_froze() -> None:
    import gc

    from convgraph.model.graph import gc_paused

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            _ = [[] for _ in range(100)]
        assert gc.get_freeze_count() == frozen and gc.isenabled()
    finally:
        gc.unfreeze()


def test_gc_paused_leaves_a_disabled_collector_disabled() -> None:
    import gc

    from convgraph.model.graph import gc_paused

    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
