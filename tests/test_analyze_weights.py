"""Constant values and shapes: initializers, Constant, ConstantOfShape, DequantizeLinear, Identity/Cast, scopes."""

from __future__ import annotations

import warnings

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph.model.weights import MAX_VALUE_ELEMENTS, constant_shape, constant_source, constant_value, elem_type


def _graph(nodes, inits=(), sparse=()) -> convgraph.ConvGraph:
    outs = [helper.make_tensor_value_info(n.output[0], TensorProto.UNDEFINED, None) for n in nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], outs,
                          list(inits), sparse_initializer=list(sparse))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
        return convgraph.load(m, check=False)


def test_constant_attribute_forms():
    cg = _graph([
        helper.make_node("Constant", [], ["f"], value_float=2.5),
        helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["i"], value_int=7),
        helper.make_node("Constant", [], ["is"], value_ints=[1, 2, 3]),
        helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones((2, 3), np.float32))),
    ])
    assert constant_value(cg, "f") == np.float32(2.5) and constant_shape(cg, "f") == ()
    np.testing.assert_array_equal(constant_value(cg, "fs"), [1.0, 2.0])
    assert constant_value(cg, "i") == 7 and constant_value(cg, "is").tolist() == [1, 2, 3]
    assert constant_shape(cg, "is") == (3,) and constant_shape(cg, "t") == (2, 3)
    assert constant_source(cg, "t") == "Constant" and constant_value(cg, "x") is None
    assert constant_source(cg, "x") == "input" and constant_source(cg, "nothing") == "unknown"


def test_constant_of_shape_default_and_huge():
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    huge = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "huge")
    cg = _graph([helper.make_node("ConstantOfShape", ["shape"], ["z"]),
                 helper.make_node("ConstantOfShape", ["huge"], ["h"],
                                  value=numpy_helper.from_array(np.array([3], np.int32)))], [shape, huge])
    z = constant_value(cg, "z")
    assert z.dtype == np.float32 and z.tolist() == [[0, 0], [0, 0]]
    assert constant_shape(cg, "h") == (1 << 20, 1 << 20) and (1 << 40) > MAX_VALUE_ELEMENTS
    assert constant_value(cg, "h") is None  # never materialized
    assert constant_source(cg, "h") == "ConstantOfShape"


def test_dequantize_per_tensor_per_axis_and_blocked():
    q = numpy_helper.from_array(np.array([[0, 10], [20, 30]], np.int8), "q")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    zp = numpy_helper.from_array(np.array(10, np.int8), "zp")
    sa = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sa")
    sb = numpy_helper.from_array(np.array([[1.0], [3.0]], np.float32), "sb")  # one scale per 2-wide block of axis 1
    cg = _graph([helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"]),
                 helper.make_node("DequantizeLinear", ["q", "sa"], ["da"], axis=0),
                 helper.make_node("DequantizeLinear", ["q", "sb"], ["db"], axis=1, block_size=2),
                 helper.make_node("Cast", ["d"], ["c"], to=TensorProto.DOUBLE),
                 helper.make_node("Identity", ["c"], ["id"])], [q, s, zp, sa, sb])
    np.testing.assert_allclose(constant_value(cg, "d"), [[-5, 0], [5, 10]])
    np.testing.assert_allclose(constant_value(cg, "da"), [[0, 10], [40, 60]])
    np.testing.assert_allclose(constant_value(cg, "db"), [[0, 10], [60, 90]])
    assert constant_value(cg, "id").dtype == np.float64 and constant_shape(cg, "id") == (2, 2)
    assert constant_source(cg, "id") == "DequantizeLinear"
    assert elem_type(cg, "q") == TensorProto.INT8


def test_sparse_initializer():
    values = numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1, 3], np.int64), "sp_idx")
    sp = helper.make_sparse_tensor(values, indices, [2, 2])
    cg = _graph([helper.make_node("Identity", ["sp"], ["y"])], sparse=[sp])
    assert constant_value(cg, "y").tolist() == [[0, 5], [0, 7]] and constant_shape(cg, "sp") == (2, 2)


def test_outer_scope_weights(models_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
        cg = convgraph.load(models_dir / "subgraph.onnx")
    subs = [g for g in cg.walk() if g.path]
    assert subs
    for g in subs:
        for nid in g.ops({"Conv"}):
            w = g.node(nid).input[1]
            assert constant_value(g, w) is not None and constant_shape(g, w) == constant_value(g, w).shape


def test_long_identity_chain_ends_cleanly():
    depth = 200  # beyond MAX_DEPTH hops: unknown, not a RecursionError
    init = numpy_helper.from_array(np.ones(2, np.float32), "w0")
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"w{i + 1}"]) for i in range(depth)]
    cg = _graph(nodes, [init])
    assert constant_value(cg, "w10").tolist() == [1, 1]
    assert constant_value(cg, f"w{depth}") is None and constant_source(cg, f"w{depth}") == "unknown"
