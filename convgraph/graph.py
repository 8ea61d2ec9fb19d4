"""ConvGraph: a lossless ONNX model ⇄ networkx.MultiDiGraph view, with subgraphs and inferred shapes.

Nodes of ``ConvGraph.graph``:

* ONNX nodes, keyed by their name (made unique; ``"{op_type}_{index}"`` when unnamed), with data
  ``kind="op"``, ``proto`` (the NodeProto), ``op_type``, ``domain``, ``attrs`` (name → Python value)
  and ``subgraphs`` (attribute name → child ConvGraph, for If/Loop/Scan bodies);
* ``"input:<name>"``, ``"initializer:<name>"``, ``"sparse_initializer:<name>"``, ``"output:<name>"``,
  and in subgraphs ``"outer:<name>"`` for tensors captured from an enclosing graph.

Edges run producer → consumer, one per (tensor, consumer input slot), keyed ``(tensor, slot)`` with data
``tensor`` and ``index``; an If/Loop/Scan node gets ``implicit=True`` edges (index -1) for the outer
tensors its bodies read, so topological order stays right. The ModelProto parts that are not nodes or
tensors (metadata, opsets, functions, value_info, doc strings) are kept as they are.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterator

import networkx as nx
import onnx
from onnx import helper

from .errors import ModelError, UsageError
from .io import PROTOBUF_LIMIT, read_model, write_model

Dim = "int | str | None"


class ConvGraphWarning(UserWarning):
    """Something the user can fix (e.g. an unset dynamic dim); the analysis goes on."""


@dataclass(frozen=True)
class TensorInfo:
    """Element type and shape of a tensor; dims are ints, symbolic names or None."""

    elem_type: int
    shape: tuple | None

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def _tensor_info(t: onnx.TypeProto) -> TensorInfo | None:
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorInfo(tt.elem_type, dims)


class ConvGraph:
    """One ONNX graph (the main graph or a subgraph) as a networkx.MultiDiGraph."""

    def __init__(self, graph: onnx.GraphProto, model: onnx.ModelProto, path: str = "", parent: "ConvGraph | None" = None):
        self.model = model
        self.path = path
        self.parent = parent
        self.graph = nx.MultiDiGraph()
        self.shapes: dict[str, TensorInfo] = {}
        self.warnings: list[str] = []
        self._producer: dict[str, str] = {}
        self._shell = onnx.GraphProto()
        for field in ("name", "doc_string"):
            if graph.HasField(field):
                setattr(self._shell, field, getattr(graph, field))
        self._shell.value_info.extend(graph.value_info)
        self._shell.quantization_annotation.extend(graph.quantization_annotation)
        if hasattr(graph, "metadata_props"):
            self._shell.metadata_props.extend(graph.metadata_props)
        self.dirty = False
        self._names: set[str] | None = None
        self._next = len(graph.node)
        self._build(graph)

    # ---- construction -------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.graph:
            name, i = f"{base}_{i}", i + 1
        return name

    def _build(self, g: onnx.GraphProto) -> None:
        G = self.graph
        for i, vi in enumerate(g.input):
            nid = self._unique(f"input:{vi.name}")
            G.add_node(nid, kind="input", proto=vi, order=(i,))
            self._producer[vi.name] = nid
        for i, t in enumerate(g.initializer):
            nid = self._unique(f"initializer:{t.name}")
            G.add_node(nid, kind="initializer", proto=t, order=(i,))
            self._producer.setdefault(t.name, nid)
        for i, t in enumerate(g.sparse_initializer):
            nid = self._unique(f"sparse_initializer:{t.values.name}")
            G.add_node(nid, kind="sparse_initializer", proto=t, order=(i,))
            self._producer.setdefault(t.values.name, nid)
        for i, node in enumerate(g.node):
            self._add_op(node, (i,))
        for nid in [n for n, d in G.nodes(data=True) if d["kind"] == "op"]:
            self._connect(nid)
        for i, vi in enumerate(g.output):
            nid = self._unique(f"output:{vi.name}")
            G.add_node(nid, kind="output", proto=vi, order=(i,))
            G.add_edge(self._source(vi.name), nid, key=(vi.name, 0), tensor=vi.name, index=0)

    def _add_op(self, node: onnx.NodeProto, order: tuple) -> str:
        nid = self._unique(node.name or f"{node.op_type}_{order[0]}")
        subs = {}
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                subs[a.name] = ConvGraph(a.g, self.model, f"{self.path}/{nid}:{a.name}", self)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for j, sg in enumerate(a.graphs):
                    subs[f"{a.name}[{j}]"] = ConvGraph(sg, self.model, f"{self.path}/{nid}:{a.name}[{j}]", self)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}
        self.graph.add_node(nid, kind="op", proto=node, op_type=node.op_type, domain=node.domain,
                            attrs=attrs, subgraphs=subs, order=order)
        for out in node.output:
            if out:
                self._producer[out] = nid
                self._taken(out)
        return nid

    def _source(self, tensor: str) -> str:
        """The node producing ``tensor``; an ``outer:`` node when it comes from an enclosing graph."""
        src = self._producer.get(tensor)
        if src is None:
            src = f"outer:{tensor}"
            if src not in self.graph:
                self.graph.add_node(src, kind="outer", proto=None, order=(-1,))
            self._producer[tensor] = src
        return src

    def _connect(self, nid: str) -> None:
        G, data = self.graph, self.graph.nodes[nid]
        for slot, t in enumerate(data["proto"].input):
            if t:
                G.add_edge(self._source(t), nid, key=(t, slot), tensor=t, index=slot)
        for t in sorted(set().union(*(s.outer_refs() for s in data["subgraphs"].values()))):
            G.add_edge(self._source(t), nid, key=(t, -1), tensor=t, index=-1, implicit=True)

    def outer_refs(self) -> set[str]:
        """Tensors this graph (or any nested body) reads from enclosing scopes."""
        return {n[len("outer:"):] for n, d in self.graph.nodes(data=True) if d["kind"] == "outer"}

    # ---- queries ------------------------------------------------------------------------------
    def ops(self, op_types: "set[str] | None" = None) -> Iterator[str]:
        """Ids of the ONNX nodes (in model order), optionally only those of the given op types."""
        for nid in self.topological_order():
            d = self.graph.nodes[nid]
            if op_types is None or d["op_type"] in op_types:
                yield nid

    def node(self, nid: str) -> onnx.NodeProto:
        return self.graph.nodes[nid]["proto"]

    def producer(self, tensor: str) -> str | None:
        """Id of the node making ``tensor`` (an op, input, initializer or outer node)."""
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[str]:
        """Ids of the nodes reading ``tensor`` (graph outputs included, implicit subgraph reads included)."""
        src = self._producer.get(tensor)
        if src is None:
            return []
        return list(dict.fromkeys(v for _, v, k in self.graph.out_edges(src, keys=True) if k[0] == tensor))

    def initializer(self, tensor: str) -> onnx.TensorProto | None:
        nid = f"initializer:{tensor}"
        return self.graph.nodes[nid]["proto"] if nid in self.graph else None

    def shape(self, tensor: str) -> tuple | None:
        info = self.shapes.get(tensor)
        if info is None and self.parent is not None and tensor in self.outer_refs():
            return self.parent.shape(tensor)
        return info.shape if info else None

    def walk(self) -> Iterator["ConvGraph"]:
        """This graph and every nested subgraph, depth first, in node order."""
        yield self
        for nid in self.ops():
            for sub in self.graph.nodes[nid]["subgraphs"].values():
                yield from sub.walk()

    def topological_order(self) -> list[str]:
        """Op node ids: model order when untouched, else a topological order stable on that order."""
        ops = [n for n, d in self.graph.nodes(data=True) if d["kind"] == "op"]
        key = lambda n: self.graph.nodes[n]["order"]  # noqa: E731
        if not self.dirty:
            return sorted(ops, key=key)
        try:
            order = nx.lexicographical_topological_sort(self.graph, key=lambda n: (self.graph.nodes[n]["order"], n))
            return [n for n in order if self.graph.nodes[n]["kind"] == "op"]
        except nx.NetworkXUnfeasible:
            raise ModelError(f"graph {self.path or 'main'} has a cycle") from None

    # ---- edits --------------------------------------------------------------------------------
    def unique_tensor(self, base: str) -> str:
        """A tensor name derived from ``base`` that no tensor in this graph (or its scopes) uses."""
        taken = self._all_tensor_names()
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _all_tensor_names(self) -> set[str]:
        """Every tensor name in the model (all scopes), cached at the root and kept up to date."""
        root = self
        while root.parent is not None:
            root = root.parent
        if root._names is None:
            root._names = set()
            for g in root.walk():
                root._names.update(g._producer)
        return root._names

    def _taken(self, name: str) -> None:
        root = self
        while root.parent is not None:
            root = root.parent
        if root._names is not None:
            root._names.add(name)

    def replace(self, old: list[str], nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = ()) -> list[str]:
        """Remove op nodes ``old`` and insert ``nodes`` (and their ``initializers``) in their place.

        The new nodes take the place of the first removed node in the order; tensors that were produced
        by removed nodes and are not produced by new ones must no longer be read. Returns the new ids.
        """
        G = self.graph
        base = min(G.nodes[n]["order"] for n in old)
        removed_outputs = set()
        for nid in old:
            removed_outputs.update(o for o in G.nodes[nid]["proto"].output if o)
        readers = set()
        for nid in old:
            for _, v, k in G.out_edges(nid, keys=True):
                if v not in old:
                    readers.add(v)
            G.remove_node(nid)
        for t in removed_outputs:
            self._producer.pop(t, None)
        for t in initializers:
            nid = self._unique(f"initializer:{t.name}")
            G.add_node(nid, kind="initializer", proto=t, order=(self._next,))
            self._next += 1
            self._producer[t.name] = nid
            self._taken(t.name)
        new_ids = [self._add_op(n, base + (i,)) for i, n in enumerate(nodes)]
        for nid in new_ids:
            self._connect(nid)
        dangling = [t for t in removed_outputs if t not in self._producer]
        for v in readers:  # reconnect the readers of the replaced outputs
            for t, slot in [(t, s) for t, s in self._reader_slots(v) if t in removed_outputs]:
                if t in dangling:
                    raise ModelError(f"replacement drops tensor {t!r} still read by {v!r}")
                G.add_edge(self._producer[t], v, key=(t, slot), tensor=t, index=slot)
        self.dirty = True
        self._mark_dirty_up()
        return new_ids

    def _reader_slots(self, nid: str) -> list[tuple[str, int]]:
        d = self.graph.nodes[nid]
        if d["kind"] == "output":
            return [(d["proto"].name, 0)]
        if d["kind"] != "op":
            return []
        slots = [(t, i) for i, t in enumerate(d["proto"].input) if t]
        slots += [(t, -1) for t in sorted(set().union(*(s.outer_refs() for s in d["subgraphs"].values())))]
        return slots

    def _mark_dirty_up(self) -> None:
        g = self.parent
        while g is not None:
            g.dirty = True
            g = g.parent

    def prune_initializers(self) -> None:
        """Drop initializers nothing reads any more (left behind by replaced nodes)."""
        for nid in [n for n, d in self.graph.nodes(data=True) if d["kind"] == "initializer"]:
            if self.graph.out_degree(nid) == 0 and not self._read_by_subgraph(self.graph.nodes[nid]["proto"].name):
                self.graph.remove_node(nid)
                self.dirty = True

    def _read_by_subgraph(self, tensor: str) -> bool:
        return any(k[0] == tensor for _, _, k in self.graph.out_edges(f"initializer:{tensor}", keys=True))

    # ---- back to ONNX -------------------------------------------------------------------------
    def _by_kind(self, kind: str) -> list:
        items = [(d["order"], d["proto"]) for _, d in self.graph.nodes(data=True) if d["kind"] == kind]
        return [p for _, p in sorted(items, key=lambda x: x[0])]

    def to_graph(self) -> onnx.GraphProto:
        """The GraphProto this view stands for (subgraph bodies rebuilt from their views)."""
        g = onnx.GraphProto()
        for field in ("name", "doc_string"):
            if self._shell.HasField(field):
                setattr(g, field, getattr(self._shell, field))
        for nid in self.topological_order():
            d = self.graph.nodes[nid]
            proto = d["proto"]
            if d["subgraphs"] and any(s.dirty for s in d["subgraphs"].values()):
                proto = _with_subgraphs(proto, d["subgraphs"])
            g.node.append(proto)
        g.input.extend(self._by_kind("input"))
        g.output.extend(self._by_kind("output"))
        g.initializer.extend(self._by_kind("initializer"))
        g.sparse_initializer.extend(self._by_kind("sparse_initializer"))
        if self.dirty:
            live = set(self._producer)
            g.value_info.extend(v for v in self._shell.value_info if v.name in live)
        else:
            g.value_info.extend(self._shell.value_info)
        g.quantization_annotation.extend(self._shell.quantization_annotation)
        if hasattr(g, "metadata_props"):
            g.metadata_props.extend(self._shell.metadata_props)
        return g

    def to_model(self) -> onnx.ModelProto:
        """A new ModelProto: the original model with this graph (and all edits) in it."""
        if self.parent is not None:
            raise UsageError("to_model() is for the main graph; use to_graph() for a subgraph")
        m = onnx.ModelProto()
        m.CopyFrom(self.model)  # CopyFrom does not serialize: fine above 2 GB
        m.graph.CopyFrom(self.to_graph())
        return m


def _with_subgraphs(node: onnx.NodeProto, subs: dict[str, ConvGraph]) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH and a.name in subs:
            a.g.CopyFrom(subs[a.name].to_graph())
        elif a.type == onnx.AttributeProto.GRAPHS:
            for j in range(len(a.graphs)):
                a.graphs[j].CopyFrom(subs[f"{a.name}[{j}]"].to_graph())
    return n


# ---- shapes ---------------------------------------------------------------------------------------
_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*([0-9,\sx]+)$")
MAX_DIM = 2**31 - 1


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``"x=1,3,640,640"`` → ``("x", [1, 3, 640, 640])``; UsageError on anything else."""
    m = _SHAPE_RE.match(text)
    if not m:
        raise UsageError(f"bad --input-shape {text!r}: expected NAME=D0,D1,... with positive integers, e.g. x=1,3,640,640")
    try:
        dims = [int(d) for d in re.split(r"[,x]", m.group(2).replace(" ", "")) if d != ""]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 or d > MAX_DIM for d in dims):
        raise UsageError(f"bad --input-shape {text!r}: dims must be integers between 1 and {MAX_DIM}")
    return m.group(1), dims


def _fixed_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    unknown = sorted(set(input_shapes) - set(inputs))
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(map(repr, unknown))}, not an input of the model "
                         f"(inputs: {', '.join(inputs) or 'none'})")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name not in input_shapes:
            continue
        dims = input_shapes[vi.name]
        if any(d <= 0 or d > MAX_DIM for d in dims):
            raise UsageError(f"--input-shape for {vi.name!r}: dims must be between 1 and {MAX_DIM}")
        shape = vi.type.tensor_type.shape
        if vi.type.tensor_type.HasField("shape") and len(shape.dim) != len(dims):
            raise UsageError(f"--input-shape for {vi.name!r} has {len(dims)} dims, the model's input has {len(shape.dim)}")
        for j, (dim, d) in enumerate(zip(shape.dim, dims)) if vi.type.tensor_type.HasField("shape") else ():
            if dim.HasField("dim_value") and dim.dim_value != d:
                raise UsageError(f"--input-shape for {vi.name!r}: dim {j} is fixed to {dim.dim_value} in the model, not {d}")
        shape.Clear()
        for d in dims:
            shape.dim.add().dim_value = d
    return m


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """onnx shape inference, strict first; returns the inferred model and a warning if strict failed."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        return model, "model over 2 GB: shape inference skipped"
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), None
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            return onnx.shape_inference.infer_shapes(model, data_prop=True), f"strict shape inference failed ({msg}); shapes are partial"
        except Exception as e2:  # noqa: BLE001 - any inference crash becomes a warning, the graph is still usable
            return model, f"shape inference failed ({str(e2).splitlines()[0] if str(e2) else type(e2).__name__}); shapes unknown"


def _collect_shapes(cg: ConvGraph, g: onnx.GraphProto) -> None:
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        info = _tensor_info(vi.type)
        if info is not None:
            cg.shapes[vi.name] = info
    for t in g.initializer:
        cg.shapes.setdefault(t.name, TensorInfo(t.data_type, tuple(t.dims)))
    ops = cg.ops()
    for nid, node in zip(ops, g.node):  # same order: the view was built from this graph
        for name, sub in cg.graph.nodes[nid]["subgraphs"].items():
            a = next(a for a in node.attribute if a.name == name.split("[")[0])
            _collect_shapes(sub, a.g if a.type == onnx.AttributeProto.GRAPH else a.graphs[int(name.split("[")[1][:-1])])


def load(source, input_shapes: "dict[str, list[int]] | None" = None, *, check: bool = True) -> ConvGraph:
    """Load a model (path, bytes or ModelProto) into a :class:`ConvGraph` with shapes inferred.

    ``input_shapes`` fixes dynamic input dims (``{"x": [1, 3, 640, 640]}``) for inference only: the
    model itself keeps its dims. Dynamic dims left unset are named in a :class:`ConvGraphWarning`.
    """
    model, base_dir = read_model(source, check=check)
    cg = ConvGraph(model.graph, model)
    cg.source_dir = base_dir
    cg.input_shapes = dict(input_shapes or {})
    inferred, warn = _infer(_fixed_inputs(model, cg.input_shapes))
    if warn:
        cg.warnings.append(warn)
    _collect_shapes(cg, inferred.graph)
    inits = {t.name for t in model.graph.initializer}
    dynamic = []
    for vi in inferred.graph.input:
        info = _tensor_info(vi.type)
        if vi.name not in inits and info is not None and (info.shape is None or not info.static):
            dims = "?" if info.shape is None else ",".join(str(d) if d is not None else "?" for d in info.shape)
            dynamic.append(f"{vi.name}=[{dims}]")
    if dynamic:
        cg.warnings.append(f"dynamic input dims left unset: {'; '.join(dynamic)}: shapes and MACs that depend on "
                           f"them are unknown; fix them with --input-shape NAME=D0,D1,... (e.g. x=1,3,640,640)")
    for w in cg.warnings:
        warnings.warn(w, ConvGraphWarning, stacklevel=2)
    return cg


def save(graph_or_model, path, *, input_path=None, in_place: bool = False):
    """Write a ConvGraph or ModelProto atomically (external data beside it above 2 GB)."""
    model = graph_or_model.to_model() if isinstance(graph_or_model, ConvGraph) else graph_or_model
    return write_model(model, path, input_path=input_path, in_place=in_place)
