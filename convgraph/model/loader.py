"""Loading a model into a :class:`~convgraph.model.graph.ConvGraph`: read, fix input shapes, infer and propagate shapes."""

from __future__ import annotations

import warnings

import onnx

from .. import io as _io
from ..errors import ConvGraphWarning
from .graph import ConvGraph, gc_paused, refresh_edges
from ..io import read_model
from .probe import probe_shapes
from .shapes import (TensorInfo, _checked_input_shapes, _dynamic_inputs, _dynamic_warning, _fixed_inputs, _infer,
                     _sub_protos, _tensor_info, _undecided_warning, checked_input_values)


def load(source, input_shapes: "dict[str, list[int]] | None" = None, *, check: bool = True,
         probe: bool = False, input_values: "dict | None" = None) -> ConvGraph:
    """Load a model (path, bytes or ModelProto) into a :class:`ConvGraph` with shapes inferred.

    ``input_shapes`` fixes dynamic input dims (``{"x": [1, 3, 640, 640]}``) for inference only: the
    model itself keeps its dims. Dynamic dims left unset are named in a :class:`ConvGraphWarning`
    (also kept in ``ConvGraph.warnings``), as is a failure of strict shape inference.
    ``probe``: measure the main-graph shapes onnx's inference could not follow by running the model
    once on generated inputs (:func:`convgraph.model.probe.probe_shapes`: needs onnxruntime and concrete input
    shapes; nothing runs when every shape is known). The measured tensors are in ``ConvGraph.measured``.
    ``input_values``: input name → values (``{"sr": 16000}``, ``--input-value``): the analysis uses them
    (shape arithmetic, If conditions) and so do the inputs ``probe`` feeds.

    Shapes come from onnx's inference completed by :func:`convgraph.model.propagate.propagate`: dims left
    dynamic are symbols (``ConvGraph.symbols``) and the shapes that depend on them
    :class:`~convgraph.model.expr.Expr` formulas; ``input_shapes`` may name symbols too (``["N", 3, "H", "W"]``).
    """
    shapes = _checked_input_shapes(input_shapes)
    with gc_paused():
        cg = _load(source, shapes, check, input_values)
        if probe:
            probe_shapes(cg)
    for w in cg.warnings:
        warnings.warn(w, ConvGraphWarning, stacklevel=2)
    return cg


def _incomplete(cg: ConvGraph) -> bool:
    """Whether some tensor an op makes lacks a static shape, or the graph has bodies (If/Loop/Scan)."""
    shapes = cg.shapes
    for d in cg.graph._node.values():
        if d["kind"] == "op":
            if d["subgraphs"]:
                return True
            for t in d["proto"].output:
                info = shapes.get(t)
                if t and (info is None or not info.static):
                    return True
    return False


def _load(source, shapes: dict[str, list[int]], check: bool, input_values=None) -> ConvGraph:
    from .propagate import propagate

    model, origin = read_model(source, check=check)
    values = checked_input_values(model, input_values, shapes)
    shapes = {**{k: list(v.shape) for k, v in values.items()}, **shapes}
    # a big model is inferred from its skeleton (the model without its weights' bytes): they are never serialized
    big = origin.skeleton is not None or origin.size > _io.SPLIT_BYTES
    base = origin.skeleton if origin.skeleton is not None else _io.skeleton(model) if big else model
    fixed = _fixed_inputs(base, shapes)  # a bad --input-shape fails before the build
    cg = ConvGraph(model.graph, model)
    cg.source_dir = origin.folder
    cg.input_shapes = shapes
    inferred, warn = _infer(fixed, None if big else origin.size, origin.data if fixed is model else None)
    if warn:
        cg.warnings.append(warn)
    _collect_shapes(cg, inferred.graph)
    cg.input_values = values
    if values or _incomplete(cg):
        propagate(cg, values)
    else:  # onnx's inference knew every shape and there is no body to enter: nothing to propagate
        refresh_edges(cg)
    dynamic = [(t, s) for t, s in _dynamic_inputs(inferred.graph) if t not in shapes]  # names given: on purpose
    if dynamic:
        cg.warnings.append(_dynamic_warning(dynamic, cg.symbols))
    undecided = _undecided_warning(cg.undecided, {t: cg.shape(t) for _, _, _, ts in cg.undecided for t in ts})
    if undecided:
        cg.warnings.append(undecided)
    return cg


def _collect_shapes(cg: "ConvGraph", g: onnx.GraphProto, _types: "dict | None" = None) -> None:
    """Fill ``cg.shapes`` (and its edges' ``info``) from the inferred ``g``, subgraphs included."""
    types = {} if _types is None else _types  # serialized TypeProto -> its TensorInfo: most tensors share a few
    shapes = cg.shapes
    for vis in (g.input, g.output, g.value_info):
        for vi in vis:
            key = vi.type.SerializeToString()
            info = types.get(key, types)
            if info is types:
                info = types[key] = _tensor_info(vi.type)
            if info is not None:
                shapes[vi.name] = info
    for t in g.initializer:
        if t.name not in shapes:
            shapes[t.name] = TensorInfo(t.data_type, tuple(t.dims))
    for s in g.sparse_initializer:
        shapes.setdefault(s.values.name, TensorInfo(s.values.data_type, tuple(s.dims)))
    G = cg.graph
    data = G._node  # networkx's node dict: a plain lookup (G.nodes[n] builds a view call per node)
    for nid, node in zip(cg._op_ids, g.node):  # same order: the view was built from this graph
        subs = data[nid]["subgraphs"]
        if subs:
            for key, body in _sub_protos(node):
                _collect_shapes(subs[key], body, types)
    # the edges' info is set by convgraph.model.propagate.propagate, which runs next and completes these shapes
