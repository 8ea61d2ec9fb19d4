"""Receptive fields through the ops that rescale or pool the grid, against ones measured with onnxruntime.

The model is conv 3×3 → OP → conv 3×3 ("last"). Measured: each input pixel is raised in its own batch
element (positive weights and inputs, so every path adds); the pixels that change an output element of
"last" are its receptive field. The largest extent over the output elements (the interior ones are not
clipped by padding) must be the analyzer's ``receptive_field``; where the jump is a whole number of input
pixels, neighbouring output elements' windows start ``effective_stride`` apart.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph.analysis.analyze import analyze
from convgraph.run.runtime import create_session, run

H = W = 16


def _chain(mid: list[onnx.NodeProto], c_mid: int, inits=()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.uniform(0.5, 1, (4, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.uniform(0.5, 1, (1, c_mid, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1] * 4), *mid,
             helper.make_node("Conv", ["m", "w2"], ["y"], name="last", pads=[1] * 4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [H * W, 1, H, W])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], [w1, w2, *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _scales(name: str, s: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([1, 1, s, s], np.float32), name)


CASES = {  # mid nodes, channels into "last", initializers
    "maxpool k2 s2": ([helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2])], 4, ()),
    "averagepool k3 s2": ([helper.make_node("AveragePool", ["a"], ["m"], kernel_shape=[3, 3], strides=[2, 2],
                                            pads=[1] * 4)], 4, ()),
    "space-to-depth 2": ([helper.make_node("SpaceToDepth", ["a"], ["m"], blocksize=2)], 16, ()),
    "depth-to-space 2": ([helper.make_node("DepthToSpace", ["a"], ["m"], blocksize=2)], 1, ()),
    "resize nearest ×2": ([helper.make_node("Resize", ["a", "", "s"], ["m"], mode="nearest")], 4, [_scales("s", 2)]),
    "resize linear ×2": ([helper.make_node("Resize", ["a", "", "s"], ["m"], mode="linear")], 4, [_scales("s", 2)]),
    "resize nearest ×½": ([helper.make_node("Resize", ["a", "", "s"], ["m"], mode="nearest")], 4,
                          [_scales("s", 0.5)]),
}


def _measured(model: onnx.ModelProto) -> tuple[tuple[int, int], list[list[int]]]:
    """(largest window extent per axis, window start rows per output row/column) over output channel 0."""
    sess = create_session(model, threads=1)
    base = np.ones((H * W, 1, H, W), np.float32)
    hot = base.copy()
    hot[np.arange(H * W), 0, np.arange(H * W) // W, np.arange(H * W) % W] += 100.0
    y0 = run(sess, {"x": base}, ["y"])[0][0, 0]
    y = run(sess, {"x": hot}, ["y"])[0][:, 0]
    changed = np.abs(y - y0) > 1e-3 * np.abs(y0).max()  # (pixel, out_y, out_x)
    extent, starts = [0, 0], [list[int](), list[int]()]
    for oy in range(y.shape[1]):
        for ox in range(y.shape[2]):
            pix = np.flatnonzero(changed[:, oy, ox])
            rows, cols = pix // W, pix % W
            extent = [max(extent[0], rows.max() - rows.min() + 1), max(extent[1], cols.max() - cols.min() + 1)]
    mid = y.shape[2] // 2, y.shape[1] // 2  # starts along the middle row and column: away from the corners
    for ox in range(y.shape[2]):
        starts[1].append(int((np.flatnonzero(changed[:, mid[1], ox]) % W).min()))
    for oy in range(y.shape[1]):
        starts[0].append(int((np.flatnonzero(changed[:, oy, mid[0]]) // W).min()))
    return (int(extent[0]), int(extent[1])), starts


@pytest.mark.parametrize("case", sorted(CASES))
def test_receptive_field_matches_onnxruntime(case):
    mid, c_mid, inits = CASES[case]
    model = _chain(mid, c_mid, inits)
    rec = {r.name: r for r in analyze(convgraph.load(model), rewrites=False).convs}["last"]
    extent, starts = _measured(model)
    assert rec.receptive_field == extent, case
    for axis, step in enumerate(rec.effective_stride):
        if float(step).is_integer() and step > 1:  # interior windows start `step` input pixels apart
            inside = [s for s in starts[axis] if 0 < s and s + extent[axis] < H]  # windows clear of the border
            assert len(inside) >= 2 and {b - a for a, b in zip(inside, inside[1:])} == {step}, (case, axis, starts)
