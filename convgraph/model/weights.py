"""Constant tensors of a graph: values and shapes of weights, wherever they come from.

A weight may be an initializer, a ``Constant`` node, ``ConstantOfShape`` of a constant shape,
``DequantizeLinear`` of constants, an ``Identity``/``Cast`` of any of these, or any of these in an
enclosing graph (for subgraph bodies). Shapes are found without computing values, and values of
absurd size are never materialized.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io import tensor_value

#: ConstantOfShape / DequantizeLinear outputs above this many elements are not materialized.
MAX_VALUE_ELEMENTS = 2**27
#: How many Identity/Cast/DequantizeLinear hops are followed (hostile chains end here).
MAX_DEPTH = 64

_PASS = ("Identity", "Cast")


def _resolve(cg, tensor: str):
    """(graph, producer id, its node data) of ``tensor``, following outer-scope references to the enclosing
    graphs; (None, None, None) when nothing makes it."""
    g = cg
    while g is not None:
        nodes = g.graph._node  # networkx's node dict: plain lookups (this runs several times per conv)
        nid = f"initializer:{tensor}"
        d = nodes.get(nid)
        if d is not None:
            return g, nid, d
        nid = g._producer.get(tensor)
        d = nodes.get(nid) if nid is not None else None
        if d is None or d["kind"] == "outer":
            g = g.parent
            continue
        return g, nid, d
    return None, None, None


def _op(d: dict) -> str | None:
    return d["op_type"] if d["kind"] == "op" and d["domain"] in ("", "ai.onnx") else None


def constant_source(cg, tensor: str, _depth: int = 0) -> str:
    """Where a constant comes from: initializer, Constant, ConstantOfShape, DequantizeLinear, input or unknown."""
    g, nid, d = _resolve(cg, tensor)
    if g is None or _depth > MAX_DEPTH:
        return "unknown"
    kind = d["kind"]
    if kind in ("initializer", "sparse_initializer"):
        return "initializer"
    if kind == "input":
        return "input"
    op = _op(d)
    if op in ("Constant", "ConstantOfShape", "DequantizeLinear"):
        return op
    if op in _PASS:
        return constant_source(g, d["proto"].input[0], _depth + 1)
    return "unknown"


def elem_type(cg, tensor: str) -> int | None:
    """The ONNX element type of ``tensor`` (from shape inference or the initializer, in this or an enclosing graph)."""
    g = cg
    while g is not None:
        info = g.shapes.get(tensor)
        if info is not None:
            return info.elem_type
        g = g.parent
    return None


def constant_shape(cg, tensor: str, _depth: int = 0) -> tuple[int, ...] | None:
    """Shape of a constant tensor without computing its value; None when it is not a constant."""
    g, nid, d = _resolve(cg, tensor)
    if g is None or _depth > MAX_DEPTH:
        return None
    kind = d["kind"]
    if kind == "initializer" or kind == "sparse_initializer":
        return tuple(d["proto"].dims)
    op = _op(d)
    if op is None:
        return None
    if op == "Constant":
        return _constant_attr_shape(d["attrs"])
    node = d["proto"]
    if op == "ConstantOfShape":
        shape = constant_value(g, node.input[0], _depth + 1) if node.input and node.input[0] else None
        return tuple(int(v) for v in shape.reshape(-1)) if shape is not None else None
    if op in _PASS or op == "DequantizeLinear":
        return constant_shape(g, node.input[0], _depth + 1)
    return None


def _constant_attr_shape(attrs: dict) -> tuple[int, ...] | None:
    if "value" in attrs:
        return tuple(attrs["value"].dims)
    if "sparse_value" in attrs:
        return tuple(attrs["sparse_value"].dims)
    for key in ("value_floats", "value_ints", "value_strings"):
        if key in attrs:
            return (len(attrs[key]),)
    if any(k in attrs for k in ("value_float", "value_int", "value_string")):
        return ()
    return None


def _sparse_to_array(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sp.values)
    dense = np.zeros(int(np.prod(sp.dims, dtype=np.int64)), dtype=values.dtype)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    if idx.ndim == 2:  # [NNZ, rank] coordinates
        idx = np.ravel_multi_index(tuple(idx.T), tuple(sp.dims))
    dense[idx.reshape(-1)] = values.reshape(-1)
    return dense.reshape(tuple(sp.dims))


def _too_big(shape) -> bool:
    return shape is None or int(np.prod(shape, dtype=np.float64)) > MAX_VALUE_ELEMENTS


def constant_value(cg, tensor: str, _depth: int = 0) -> np.ndarray | None:
    """The value of a constant tensor; None when it is not constant (or too large to materialize)."""
    g, nid, d = _resolve(cg, tensor)
    if g is None or _depth > MAX_DEPTH:
        return None
    if d["kind"] == "initializer":
        return tensor_value(d["proto"])  # read from disk when its bytes stayed there (big weights)
    if d["kind"] == "sparse_initializer":
        return _sparse_to_array(d["proto"])
    op = _op(d)
    if op is None:
        return None
    node, attrs = d["proto"], d["attrs"]
    if op == "Constant":
        return _constant_attr_value(attrs)
    if op == "ConstantOfShape":
        shape = constant_shape(g, node.output[0], _depth + 1)
        if shape is None or _too_big(shape):
            return None
        fill = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
        return np.full(shape, fill[0], dtype=fill.dtype)
    if op == "Identity":
        return constant_value(g, node.input[0], _depth + 1)
    if op == "Cast":
        x = constant_value(g, node.input[0], _depth + 1)
        return None if x is None else x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "DequantizeLinear":
        return _dequantize(g, node, attrs, _depth)
    return None


def _constant_attr_value(attrs: dict) -> np.ndarray | None:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "sparse_value" in attrs:
        return _sparse_to_array(attrs["sparse_value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def _dequantize(g, node: onnx.NodeProto, attrs: dict, depth: int) -> np.ndarray | None:
    """(x − zero_point) · scale, per tensor, per axis, or per block (opset 21 ``block_size``)."""
    if _too_big(constant_shape(g, node.input[0], depth + 1)):
        return None
    x = constant_value(g, node.input[0], depth + 1)
    scale = constant_value(g, node.input[1], depth + 1) if len(node.input) > 1 else None
    if x is None or scale is None:
        return None
    zp = constant_value(g, node.input[2], depth + 1) if len(node.input) > 2 and node.input[2] else None
    axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
    block = int(attrs.get("block_size", 0))

    def expand(p: np.ndarray) -> np.ndarray:
        if p.ndim == 0 or p.size == 1:
            return p.reshape(())
        if block:
            p = np.repeat(p, block, axis=axis)[tuple(slice(0, n) for n in x.shape)]
            return p
        shape = [1] * x.ndim
        shape[axis] = p.size
        return p.reshape(shape)

    xf = x.astype(np.float64)
    if zp is not None:
        xf = xf - expand(zp.astype(np.float64))
    return (xf * expand(scale.astype(np.float64))).astype(scale.dtype)
