"""A rewrite checked on its own: the nodes it removed and the nodes it put in, as two standalone models.

Judging a rewritten node inside the whole model mixes in every other rewrite upstream of it (an exact
rewrite behind an approximate one looks approximate) and cannot reach nodes inside If/Loop/Scan bodies.
A :class:`Region` instead captures, at the moment of the rewrite, the old nodes with their constants and
the new nodes with theirs; both run on the same inputs — the activations the rewritten model really
feeds there, where they can be had, and standard-normal tensors of the inferred shapes — and their
outputs (the tensors the replacement keeps by name) are compared on the scale of the old output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..run.metrics import cosine
from ..model.weights import constant_source, constant_value


class _Unresolved(Exception):
    """A constant input whose value cannot be had: the region cannot stand alone."""


@dataclass
class Region:
    """One rewrite as two standalone models with the same inputs (activations) and outputs."""

    before: onnx.ModelProto
    after: onnx.ModelProto
    inputs: list[str]  # activation tensors the region reads, in both models
    outputs: list[str]  # tensors the replacement keeps by name
    shapes: dict[str, tuple | None]  # input → inferred shape (None or symbolic dims where unknown)
    dtypes: dict[str, np.dtype]


@dataclass
class Captured:
    """The old side of a rewrite, read before it is spliced in (its constants leave the graph with it)."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    consts: dict[str, np.ndarray]
    types: dict[str, int]
    shapes: dict[str, tuple | None]


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[str], outputs: Sequence[str],
           consts: Mapping[str, np.ndarray], types: Mapping[str, int], model: onnx.ModelProto) -> onnx.ModelProto:
    g = helper.make_graph(
        list(nodes), "region",
        [helper.make_tensor_value_info(t, types[t], None) for t in inputs],
        [helper.make_tensor_value_info(t, types.get(t, 0), None) for t in outputs],
        [numpy_helper.from_array(np.asarray(v), t) for t, v in consts.items()])
    # IR < 4 wants every initializer listed as an input too: a standalone region is written in a later IR
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 7))


def _split(graph, nodes: Sequence[onnx.NodeProto]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The tensors ``nodes`` read from outside themselves: (activations, constants with their values)."""
    made = {o for n in nodes for o in n.output}
    acts: list[str] = []
    consts: dict[str, np.ndarray] = {}
    for n in nodes:
        for t in n.input:
            if not t or t in made or t in consts or t in acts:
                continue
            v = constant_value(graph, t)
            if v is None:
                if constant_source(graph, t) in ("initializer", "Constant", "ConstantOfShape"):
                    raise _Unresolved(t)  # a constant too large to materialize: not an activation
                acts.append(t)
            else:
                consts[t] = v
    return acts, consts


def capture(graph, old: Sequence[onnx.NodeProto]) -> Captured | None:
    """Read the old nodes of a rewrite (``graph`` before the splice); None when they cannot stand alone
    (a node holding a subgraph, an input of unknown type)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in old for a in n.attribute):
        return None
    nodes = []
    for n in old:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        nodes.append(c)
    try:
        acts, consts = _split(graph, nodes)
    except _Unresolved:
        return None
    types = {}
    for t in acts + [o for n in nodes for o in n.output]:
        info = graph.shape_info(t)
        types[t] = info.elem_type if info is not None else 0
    if any(not types[t] for t in acts):
        return None
    return Captured(nodes, acts, consts, types, {t: graph.shape(t) for t in acts})


def build(graph, old: Captured, new: Sequence[onnx.NodeProto], model: onnx.ModelProto) -> Region | None:
    """The region of a rewrite: ``old`` as captured, ``new`` read from ``graph`` after the splice.
    None when the new nodes read an activation the old ones did not."""
    kept = {o for n in old.nodes for o in n.output}
    outputs = [o for n in new for o in n.output if o in kept]
    try:
        acts, consts = _split(graph, new)
    except _Unresolved:
        return None
    if not outputs or not set(acts) <= set(old.inputs):
        return None
    before = _model(old.nodes, old.inputs, outputs, old.consts, old.types, model)
    after = _model(list(new), old.inputs, outputs, consts, old.types, model)
    dtypes = {t: np.dtype(helper.tensor_dtype_to_np_dtype(old.types[t])) for t in old.inputs}
    return Region(before, after, list(old.inputs), outputs, dict(old.shapes), dtypes)


def random_feeds(region: Region, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Standard-normal inputs of the inferred shapes; None when a shape is not fully known."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in region.inputs:
        shape = region.shapes.get(t)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape) or math.prod(shape) > 2**26:
            return None
        if region.dtypes[t].kind != "f":
            return None
        feeds[t] = rng.standard_normal(shape).astype(region.dtypes[t])
    return feeds


def errors(region: Region, feeds: Mapping[str, np.ndarray], provider: str = "cpu",
           opt_level: str = "basic") -> tuple[float, float, float]:
    """(max abs error / max abs old output, cosine, RMS error) of the new nodes against the old, on ``feeds``
    (``opt_level`` "all" runs quantized nodes with onnxruntime's int8 kernels, as the model will run)."""
    from ..run.runtime import create_session, run

    got = []
    for m in (region.before, region.after):
        sess = create_session(m, provider=provider, threads=1, opt_level=opt_level)
        got.append(run(sess, {t: feeds[t] for t in region.inputs}, region.outputs))
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in got[0]])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in got[1]])
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    err = diff / scale if scale else (0.0 if diff == 0 else math.inf)
    rms = float(np.sqrt(np.mean((a - b) ** 2))) if a.size else 0.0
    return err, cosine(float(a @ b), float(a @ a), float(b @ b)), rms


def standalone(graph, nodes: Sequence[onnx.NodeProto], inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto | None:
    """``nodes`` of ``graph`` as a model of their own: ``inputs`` (activations) typed and shaped as ``graph``
    knows them, their constants as initializers, ``outputs`` as outputs; None when a constant cannot be read."""
    try:
        _, consts = _split(graph, nodes)
    except _Unresolved:
        return None
    g = helper.make_graph(list(nodes), "region", [_info(graph, t) for t in inputs], [_info(graph, t) for t in outputs],
                          [numpy_helper.from_array(np.asarray(v), t) for t, v in consts.items()])
    model = graph.model
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 7))


def _info(graph, tensor: str) -> onnx.ValueInfoProto:
    info = graph.shape_info(tensor)
    shape = info.shape if info is not None else None
    dims = None if shape is None else [d if isinstance(d, int) and d > 0 else None for d in shape]
    return helper.make_tensor_value_info(tensor, info.elem_type if info is not None else 0, dims)
