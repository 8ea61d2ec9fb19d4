"""offset_roots: what an output adds a constant grid to, judged beside it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convgraph.run.offsets import offset_roots


def _model(tail: str) -> onnx.ModelProto:
    """x → conv → (tail) → y, with a class-score branch sigmoid(conv) concatenated beside it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "wc"),
             numpy_helper.from_array(np.arange(4 * 16, dtype=np.float32).reshape(1, 4, 4, 4), "grid"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["d"], name="box"),
             helper.make_node("Conv", ["x", "wc"], ["c"], name="cls"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig")]
    if tail == "grid":  # (grid − d) · 2: YOLO's x1y1 in pixels
        nodes += [helper.make_node("Sub", ["grid", "d"], ["g"]), helper.make_node("Mul", ["g", "two"], ["b"])]
    elif tail == "shape-grid":  # the grid built from the feature map's shape, as YOLOv8's export does
        nodes += [helper.make_node("Shape", ["d"], ["sh"]),
                  helper.make_node("ConstantOfShape", ["sh"], ["ones"],
                                   value=numpy_helper.from_array(np.array([1.0], np.float32))),
                  helper.make_node("Mul", ["ones", "grid"], ["gr"]), helper.make_node("Add", ["d", "gr"], ["b"])]
    elif tail == "bias":  # a scalar added: no grid
        nodes.append(helper.make_node("Add", ["d", "two"], ["b"]))
    else:
        nodes.append(helper.make_node("Identity", ["d"], ["b"]))
    nodes.append(helper.make_node("Concat", ["b", "s"], ["y"], axis=1))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_grid_added_before_the_output_makes_its_inputs_judged():
    assert offset_roots(_model("grid")) == ["d", "s"]
    assert offset_roots(_model("shape-grid")) == ["d", "s"]


def test_outputs_without_a_constant_grid_are_judged_as_they_are():
    assert offset_roots(_model("bias")) == [] and offset_roots(_model("none")) == []


def test_yolov8n_boxes_are_judged_on_the_dfl_distances(real_models):
    model = onnx.load(real_models("yolov8n"))
    assert offset_roots(model) == ["/model.22/Sigmoid_output_0", "/model.22/dfl/conv/Conv_output_0"]
    for name in ("ppocr-det", "ppocr-cls"):
        assert offset_roots(onnx.load(real_models(name))) == []


def test_verify_judges_what_the_grid_hides():
    """Box distances 10% off: the output's box part (grid − d) · 2 keeps a cosine near 1, the distances do not."""
    from convgraph.engine.verify import verify

    ref = _model("grid")
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    w = cand.graph.initializer[0]
    noise = np.random.default_rng(1).standard_normal(tuple(w.dims)).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 0.3 * noise, "w"))
    report = verify(ref, cand, samples=2, min_cosine=0.99)
    assert report.judged_beside == ["d", "s"]
    assert report.outputs["y"].cosine > 0.99 and report.outputs["d"].cosine < 0.99
    assert not report.passed
    given = verify(ref, cand, samples=2, min_cosine=0.99, tensors=["y"])  # --tensor: only what is named
    assert given.passed and given.judged_beside == []


def test_verify_warns_when_the_candidate_lacks_what_the_grid_hides():
    from convgraph.engine.verify import verify

    ref = _model("grid")
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    for n in cand.graph.node:  # the box conv's output renamed, as another tool might
        n.input[:] = ["d2" if t == "d" else t for t in n.input]
        n.output[:] = ["d2" if t == "d" else t for t in n.output]
    report = verify(ref, cand, samples=1)
    assert report.judged_beside == ["s"] and any(w.startswith("not judged: d ") for w in report.warnings)
