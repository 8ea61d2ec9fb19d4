"""ConvGraph: a lossless ONNX model ⇄ networkx.MultiDiGraph view, with subgraphs and inferred shapes.

The shapes themselves live in :mod:`convgraph.model.shapes` (input shapes, onnx's inference) and
:mod:`convgraph.model.probe` (shapes measured with onnxruntime); :mod:`convgraph.model.loader` builds a ConvGraph from a model.

Nodes of ``ConvGraph.graph``:

* ONNX nodes, keyed by their name (made unique; ``"{op_type}_{index}"`` when unnamed), with data
  ``kind="op"``, ``proto`` (the NodeProto), ``op_type``, ``domain``, ``attrs`` (name → Python value)
  and ``subgraphs`` (attribute name → child ConvGraph, for If/Loop/Scan bodies);
* ``"input:<name>"``, ``"initializer:<name>"``, ``"sparse_initializer:<name>"``, ``"output:<name>"``,
  and in subgraphs ``"outer:<name>"`` for tensors captured from an enclosing graph.

Edges run producer → consumer, one per (tensor, consumer input slot), keyed ``(tensor, slot)`` with data
``tensor``, ``index`` and ``info`` (its TensorInfo, None when unknown); an If/Loop/Scan node gets
``implicit=True`` edges (index -1) for the outer tensors its bodies read, so topological order stays
right. An initializer that is also listed as a graph input (IR < 4) is the producer of its tensor; the
input node stands for the override. The ModelProto parts that are not nodes or tensors (metadata,
opsets, functions, value_info, doc strings) are kept as they are.

Op nodes carry an ``order`` key (a tuple) such that sorting ops by it is always a topological order:
model order at load, new nodes in place of the ones they replace, renumbered only when an edit needs it.
"""

from __future__ import annotations

import contextlib
import gc
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator

import networkx as nx
import onnx
from onnx import helper

from ..errors import ModelError, UsageError
from ..io import copy_fields, write_model
from .shapes import TensorInfo, _sub_protos

_A = onnx.AttributeProto


_ATTR_VALUE = {
    _A.FLOAT: lambda a: a.f, _A.INT: lambda a: a.i, _A.STRING: lambda a: a.s, _A.TENSOR: lambda a: a.t,
    _A.SPARSE_TENSOR: lambda a: a.sparse_tensor, _A.TYPE_PROTO: lambda a: a.tp, _A.FLOATS: lambda a: list(a.floats),
    _A.INTS: lambda a: list(a.ints), _A.STRINGS: lambda a: list(a.strings), _A.TENSORS: lambda a: list(a.tensors),
    _A.SPARSE_TENSORS: lambda a: list(a.sparse_tensors), _A.TYPE_PROTOS: lambda a: list(a.type_protos),
}


def _attr_value(a: onnx.AttributeProto):
    """The Python value of an attribute, as onnx.helper.get_attribute_value gives it (None for a reference)."""
    get = _ATTR_VALUE.get(a.type)
    return None if get is None or a.ref_attr_name else get(a)


def free_names(g: onnx.GraphProto) -> set[str]:
    """Tensors ``g`` (or a body nested in it) reads without defining them: its outer-scope captures."""
    defined = {v.name for v in g.input} | {t.name for t in g.initializer}
    defined |= {s.values.name for s in g.sparse_initializer}
    read: set[str] = set()
    for node in g.node:
        read.update(t for t in node.input if t)
        for _, sub in _sub_protos(node):
            read |= free_names(sub)
        defined.update(node.output)
    read.update(v.name for v in g.output)
    return read - defined


class ConvGraph:
    """One ONNX graph (the main graph or a subgraph) as a networkx.MultiDiGraph."""

    def __init__(self, graph: onnx.GraphProto, model: onnx.ModelProto, path: str = "",
                 parent: "ConvGraph | None" = None, owner: str | None = None):
        self.model = model  # the ModelProto as loaded (to_model() builds the edited one)
        self.path = path  # "" for the main graph, "/<node id>:<attribute>" for a body
        self.parent = parent
        self.owner = owner  # id of the If/Loop/Scan node in ``parent`` this body belongs to
        self.graph = nx.MultiDiGraph()
        self.shapes: dict[str, TensorInfo] = {}
        self.measured: set[str] = set()  # tensors whose shapes convgraph.model.probe.probe_shapes measured
        self.warnings: list[str] = []
        self.input_shapes: dict[str, list] = {}
        self.input_values: dict = {}  # input name → the numpy array the user fixed (--input-value)
        self.symbols: dict[str, dict] = {}  # main graph: identifier → {"input", "axis"} of each dynamic dim
        self.undecided: list = []  # main graph: (graph path, If node, inputs whose values / shape alone it reads)
        self.taken: bool | None = None  # an If branch: taken (True), not taken (False), or unknown
        self.source_dir: Path | None = None
        self._producer: dict[str, str] = {}
        self._outer: dict[str, str] = {}  # captured tensor -> its "outer:" node
        self._suffix: dict[str, int] = {}  # id base -> next suffix to try
        self._twins = {v.name for v in graph.input} & {t.name for t in graph.initializer}
        self._op_ids: list[str] = []  # op ids in model order, as built
        self._next_init = len(graph.initializer)
        self._order_cache: list[str] | None = None
        self._dirty = False
        self._names: set[str] | None = None
        self._shell = onnx.GraphProto()
        for field in ("name", "doc_string"):
            if graph.HasField(field):
                setattr(self._shell, field, getattr(graph, field))
        self._shell.value_info.extend(graph.value_info)
        self._shell.quantization_annotation.extend(graph.quantization_annotation)
        if hasattr(graph, "metadata_props"):
            self._shell.metadata_props.extend(graph.metadata_props)
        self._build(graph)

    @property
    def dirty(self) -> bool:
        """True once this graph was edited; setting it (after editing ``graph`` directly) drops caches."""
        return self._dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self._dirty = value
        self._order_cache = None

    # ---- construction -------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        if base not in self.graph:
            return base
        i = self._suffix.get(base, 1)
        while f"{base}_{i}" in self.graph:
            i += 1
        self._suffix[base] = i + 1
        return f"{base}_{i}"

    def _build(self, g: onnx.GraphProto) -> None:
        G, producer = self.graph, self._producer
        for i, vi in enumerate(g.input):
            nid = self._unique(f"input:{vi.name}")
            G.add_node(nid, kind="input", proto=vi, order=(i,))
            producer[vi.name] = nid
        for i, t in enumerate(g.initializer):
            nid = self._unique(f"initializer:{t.name}")
            G.add_node(nid, kind="initializer", proto=t, order=(i,))
            producer[t.name] = nid  # an initializer also listed as input: the initializer makes it
        for i, t in enumerate(g.sparse_initializer):
            nid = self._unique(f"sparse_initializer:{t.values.name}")
            G.add_node(nid, kind="sparse_initializer", proto=t, order=(i,))
            producer.setdefault(t.values.name, nid)
        self._op_ids = [self._add_op(node, (i,)) for i, node in enumerate(g.node)]
        # _connect, inlined for the build: nothing is removed yet, so every producer found is live
        add_edge, data = G.add_edge, G._node  # networkx's node dict: a plain lookup per node
        for nid, node in zip(self._op_ids, g.node):
            for slot, t in enumerate(node.input):
                if t:
                    src = producer.get(t) or self._source(t)
                    add_edge(src, nid, key=(t, slot), tensor=t, index=slot, info=None)
            if data[nid]["subgraphs"]:
                for t in self._captures(nid):
                    self._add_edge(self._source(t), nid, t, -1)
        for i, vi in enumerate(g.output):
            nid = self._unique(f"output:{vi.name}")
            G.add_node(nid, kind="output", proto=vi, order=(i,))
            self._add_edge(self._source(vi.name), nid, vi.name, 0)

    def _add_op(self, node: onnx.NodeProto, order: tuple) -> str:
        nid = self._unique(node.name or f"{node.op_type}_{'.'.join(map(str, order))}")
        attrs, subs = {}, {}
        for a in node.attribute:
            kind = a.type
            if kind == _A.GRAPH:
                subs[a.name] = ConvGraph(a.g, self.model, f"{self.path}/{nid}:{a.name}", self, nid)
            elif kind == _A.GRAPHS:
                for j, body in enumerate(a.graphs):
                    key = f"{a.name}[{j}]"
                    subs[key] = ConvGraph(body, self.model, f"{self.path}/{nid}:{key}", self, nid)
            else:
                attrs[a.name] = _attr_value(a)
        self.graph.add_node(nid, kind="op", proto=node, op_type=node.op_type, domain=node.domain,
                            attrs=attrs, subgraphs=subs, order=order)
        outputs = node.output
        producer = self._producer
        for out in outputs:
            if out:
                producer[out] = nid
        if self._names is not None or self.parent is not None:
            for out in outputs:
                self._taken(out)
        return nid

    def _source(self, tensor: str) -> str:
        """The node producing ``tensor``; an ``outer:`` node when it comes from an enclosing graph."""
        src = self._producer.get(tensor)
        if src is None or src not in self.graph:
            src = self._unique(f"outer:{tensor}")
            self.graph.add_node(src, kind="outer", proto=None, tensor=tensor, order=(-1,))
            self._producer[tensor] = self._outer[tensor] = src
        return src

    def _add_edge(self, u: str, v: str, tensor: str, slot: int) -> None:
        info = self.shape_info(tensor) if self.shapes else None
        if slot == -1:
            self.graph.add_edge(u, v, key=(tensor, -1), tensor=tensor, index=-1, info=info, implicit=True)
        else:
            self.graph.add_edge(u, v, key=(tensor, slot), tensor=tensor, index=slot, info=info)

    def _connect(self, nid: str) -> None:
        data = self.graph.nodes[nid]
        for slot, t in enumerate(data["proto"].input):
            if t:
                self._add_edge(self._source(t), nid, t, slot)
        for t in self._captures(nid):
            self._add_edge(self._source(t), nid, t, -1)

    def _captures(self, nid: str) -> list[str]:
        """Outer tensors the bodies of op ``nid`` read (sorted)."""
        subs = self.graph.nodes[nid]["subgraphs"]
        return sorted(set().union(*(s._outer for s in subs.values()))) if subs else []

    def outer_refs(self) -> set[str]:
        """Tensors this graph (or any nested body) reads from enclosing scopes."""
        return set(self._outer)

    # ---- queries ------------------------------------------------------------------------------
    def ops(self, op_types: "Iterable[str] | None" = None) -> Iterator[str]:
        """Ids of the ONNX nodes in topological (model) order, optionally only those of the given op types."""
        wanted = None if op_types is None else set(op_types)
        nodes = self.graph.nodes
        for nid in self.topological_order():
            if wanted is None or nodes[nid]["op_type"] in wanted:
                yield nid

    def node(self, nid: str) -> onnx.NodeProto:
        return self.graph.nodes[nid]["proto"]

    def producer(self, tensor: str) -> str | None:
        """Id of the node making ``tensor`` (an op, input, initializer or outer node)."""
        src = self._producer.get(tensor)
        return src if src is not None and src in self.graph._node else None

    def consumers(self, tensor: str) -> list[str]:
        """Ids of the nodes reading ``tensor`` (graph outputs included, implicit subgraph reads included)."""
        src = self.producer(tensor)
        if src is None:
            return []
        out = []
        for v, keys in self.graph._succ[src].items():  # networkx's adjacency: {reader: {(tensor, slot): data}}
            for key in keys:
                if key[0] == tensor:
                    out.append(v)
                    break
        return out

    def initializer(self, tensor: str) -> onnx.TensorProto | None:
        """The initializer holding ``tensor`` in this graph, if one does."""
        src = self.producer(tensor)
        d = self.graph.nodes[src] if src is not None else None
        return d["proto"] if d is not None and d["kind"] == "initializer" else None

    def shape_info(self, tensor: str) -> TensorInfo | None:
        """Element type and shape of ``tensor`` (looked up in enclosing graphs for outer captures)."""
        info = self.shapes.get(tensor)
        if info is None and self.parent is not None and tensor in self._outer:
            return self.parent.shape_info(tensor)
        return info

    def shape(self, tensor: str) -> tuple | None:
        info = self.shape_info(tensor)
        return info.shape if info else None

    def shape_measured(self, tensor: str) -> bool:
        """Whether the shape of ``tensor`` was measured by running the model (:func:`~convgraph.model.probe.probe_shapes`)
        rather than inferred (looked up in enclosing graphs for outer captures)."""
        if tensor in self.measured:
            return True
        return self.parent is not None and tensor in self._outer and self.parent.shape_measured(tensor)

    def walk(self) -> Iterator["ConvGraph"]:
        """This graph and every nested subgraph, depth first, in node order."""
        yield self
        data = self.graph._node  # networkx's node dict: a plain lookup per op
        for nid in self.topological_order():
            for sub in data[nid]["subgraphs"].values():
                yield from sub.walk()

    def topological_order(self) -> list[str]:
        """Op node ids in a topological order: model order when untouched, edits in place of what they replaced."""
        if self._order_cache is None:
            ops = [(d["order"], n) for n, d in self.graph._node.items() if d["kind"] == "op"]
            ops.sort(key=itemgetter(0))  # stable: ties (none in practice) keep the graph's order
            self._order_cache = [n for _, n in ops]
        return list(self._order_cache)

    # ---- edits --------------------------------------------------------------------------------
    def unique_tensor(self, base: str) -> str:
        """A tensor name derived from ``base`` that no tensor in this graph (or its scopes) uses."""
        taken = self._all_tensor_names()
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _root(self) -> "ConvGraph":
        g = self
        while g.parent is not None:
            g = g.parent
        return g

    def _all_tensor_names(self) -> set[str]:
        """Every tensor name in the model (all scopes), cached at the root and kept up to date."""
        root = self._root()
        if root._names is None:
            root._names = set()
            for g in root.walk():
                root._names.update(g._producer)
        return root._names

    def _taken(self, name: str) -> None:
        root = self._root()
        if root._names is not None:
            root._names.add(name)

    def _visible(self, tensor: str) -> bool:
        """Whether ``tensor`` is defined in this graph or an enclosing one."""
        g: ConvGraph | None = self
        while g is not None:
            if g.producer(tensor) is not None and tensor not in g._outer:
                return True
            g = g.parent
        return False

    def replace(self, old: list[str], nodes: list[onnx.NodeProto], initializers: Iterable[onnx.TensorProto] = ()) -> list[str]:
        """Remove op nodes ``old`` and insert ``nodes`` (and their ``initializers``) in their place.

        The new nodes take the place of the first removed node in the order (the graph is renumbered
        when they read a tensor made later). Everything is checked before anything changes: tensors
        the new nodes read must exist, tensors they make must not exist already, tensors of removed
        nodes must no longer be read unless the new nodes make them again, and no cycle may appear.
        An edit inside a subgraph shows in the parent's ``to_model()``. Returns the new ids.
        """
        G = self.graph
        old = list(dict.fromkeys(old))
        if not old:
            raise UsageError("replace() needs at least one node to remove")
        bad = [n for n in old if n not in G or G.nodes[n]["kind"] != "op"]
        if bad:
            raise UsageError(f"replace(): {bad[0]!r} is not an op node of graph {self.path or 'main'}")
        nodes, initializers = list(nodes), list(initializers)
        old_set = set(old)
        removed = {o for n in old for o in G.nodes[n]["proto"].output if o}
        made = [o for n in nodes for o in n.output if o] + [t.name for t in initializers]
        made_set = set(made)
        self._check_replacement(old_set, removed, nodes, made, made_set)

        # -- mutate (nothing below can fail on a user's input) --
        readers = {v for n in old for _, v in G.out_edges(n) if v not in old_set}
        outer_before = {u for n in old for u, _ in G.in_edges(n) if G.nodes[u]["kind"] == "outer"}
        base = min(G.nodes[n]["order"] for n in old)
        G.remove_nodes_from(old)
        for t in removed:
            self._producer.pop(t, None)
        for t in initializers:
            nid = self._unique(f"initializer:{t.name}")
            G.add_node(nid, kind="initializer", proto=t, order=(self._next_init,))
            self._next_init += 1
            self._producer[t.name] = nid
            self._taken(t.name)
        new_ids = [self._add_op(n, base + (i,)) for i, n in enumerate(nodes)]
        for nid in new_ids:
            self._connect(nid)
        for v in readers:  # reconnect the readers of the tensors the new nodes make again
            for t, slot in self._reader_slots(v):
                if t in removed and not G.has_edge(self._producer[t], v, (t, slot)):
                    self._add_edge(self._producer[t], v, t, slot)
        self.dirty = True
        self._drop_unused_outer(outer_before)
        if any(self._out_of_order(u, v) for nid in new_ids for u, v in G.in_edges(nid)):
            self._renumber()
        self._after_edit()
        return new_ids

    def _check_replacement(self, old: set[str], removed: set[str], nodes: list[onnx.NodeProto],
                           made: list[str], made_set: set[str]) -> None:
        G, where = self.graph, f"graph {self.path or 'main'}"
        if len(made) != len(made_set):
            dup = next(t for t in made if made.count(t) > 1)
            raise ModelError(f"replacement makes tensor {dup!r} twice")
        for t in made:
            src = self.producer(t)
            if t not in removed and (src is not None or (self.parent is not None and self.parent._visible(t))):
                raise ModelError(f"replacement makes tensor {t!r}, which {src or 'an enclosing graph'!r} already makes")
        for n in old:
            for _, v, (t, _slot) in G.out_edges(n, keys=True):
                if v not in old and t not in made_set:
                    raise ModelError(f"replacement drops tensor {t!r} still read by {v!r}")
        reads: list[str] = []
        for n in nodes:
            reads.extend(t for t in n.input if t)
            for _, body in _sub_protos(n):
                reads.extend(sorted(free_names(body)))
        late: list[str] = []
        for t in dict.fromkeys(reads):
            if t in made_set or t in self._outer:
                continue
            src = self.producer(t)
            if t in removed:
                raise ModelError(f"replacement reads tensor {t!r}, which only the removed nodes make")
            if src is not None:
                if G.nodes[src]["kind"] == "op":
                    late.append(src)
            elif self.parent is not None and self.parent._visible(t):
                self._check_capture(t)
            else:
                raise ModelError(f"replacement reads tensor {t!r}, which nothing in {where} (or around it) makes")
        base = min(G.nodes[n]["order"] for n in old)
        late = [p for p in late if G.nodes[p]["order"] > base]
        if late:
            starts = [v for n in old for _, v, (t, _s) in G.out_edges(n, keys=True) if v not in old and t in made_set]
            if self._reaches(starts, set(late), skip=old):
                raise ModelError(f"replacement in {where} would make a cycle: a node it reads from depends on it")

    def _check_capture(self, tensor: str) -> None:
        """A new read of outer ``tensor`` adds an implicit edge to the owner node: it must not close a cycle."""
        for par, owner in self._enclosing():
            src = par.producer(tensor)
            if src is not None and tensor not in par._outer:
                if par.graph.nodes[src]["kind"] == "op" and par._reaches([owner], {src}, skip=()):
                    raise ModelError(f"replacement in graph {self.path} reads {tensor!r}, which depends on "
                                     f"the node {owner!r} that holds the subgraph: a cycle")
                return

    def _enclosing(self) -> Iterator[tuple[ConvGraph, str]]:
        """(graph, id of the node holding the body) for each graph enclosing this one, innermost first."""
        g = self
        while g.parent is not None and g.owner is not None:
            yield g.parent, g.owner
            g = g.parent

    def _reaches(self, starts: list[str], targets: set[str], skip: Iterable[str]) -> bool:
        """Whether any op in ``targets`` is reachable from ``starts`` (ops only, ignoring ``skip``).

        Edges only go up in ``order``, so the search stops past the latest target.
        """
        nodes, succ = self.graph.nodes, self.graph.succ
        limit = max(nodes[t]["order"] for t in targets)
        seen, stack = set(skip), [s for s in starts if nodes[s]["kind"] == "op"]
        while stack:
            n = stack.pop()
            if n in targets:
                return True
            if n in seen or nodes[n]["order"] > limit:
                continue
            seen.add(n)
            stack.extend(v for v in succ[n] if nodes[v]["kind"] == "op" and v not in seen)
        return False

    def _out_of_order(self, u: str, v: str) -> bool:
        nodes = self.graph.nodes
        return nodes[u]["kind"] == "op" and nodes[v]["kind"] == "op" and nodes[u]["order"] >= nodes[v]["order"]

    def _renumber(self) -> None:
        """Give the ops fresh ``order`` keys: a topological order as close to the current one as can be."""
        nodes = self.graph.nodes
        try:
            seq = nx.lexicographical_topological_sort(self.graph, key=lambda n: (nodes[n]["order"], n))
            ops = [n for n in seq if nodes[n]["kind"] == "op"]
        except nx.NetworkXUnfeasible:
            raise ModelError(f"graph {self.path or 'main'} has a cycle") from None
        for i, n in enumerate(ops):
            nodes[n]["order"] = (i,)
        self._order_cache = None

    def _drop_unused_outer(self, candidates: Iterable[str]) -> None:
        nodes = self.graph.nodes
        for n in candidates:
            if n in nodes and nodes[n]["kind"] == "outer" and self.graph.out_degree(n) == 0:
                t = self.graph.nodes[n]["tensor"]
                self.graph.remove_node(n)
                self._outer.pop(t, None)
                self._producer.pop(t, None)

    def _after_edit(self) -> None:
        """Mark the enclosing graphs dirty and keep the owner's implicit edges equal to this body's captures."""
        for par, owner in self._enclosing():
            par.dirty = True
            have = {k[0]: u for u, _, k in par.graph.in_edges(owner, keys=True) if k[1] == -1}
            want = par._captures(owner)
            gone = [have[t] for t in have if t not in want]
            for t in have:
                if t not in want:
                    par.graph.remove_edge(have[t], owner, (t, -1))
            for t in want:
                if t not in have:
                    par._add_edge(par._source(t), owner, t, -1)
            par._drop_unused_outer(gone)
            if any(par._out_of_order(u, owner) for u, _ in par.graph.in_edges(owner)):
                par._renumber()

    def _reader_slots(self, nid: str) -> list[tuple[str, int]]:
        d = self.graph.nodes[nid]
        if d["kind"] == "output":
            return [(d["proto"].name, 0)]
        if d["kind"] != "op":
            return []
        return [(t, i) for i, t in enumerate(d["proto"].input) if t] + [(t, -1) for t in self._captures(nid)]

    def prune_initializers(self) -> list[str]:
        """Drop the initializers nothing reads any more (left behind by replaced nodes); returns their names.

        An initializer that is also a graph input (IR < 4) goes with its input.
        """
        G, gone = self.graph, []
        for nid in [n for n, d in G.nodes(data=True) if d["kind"] == "initializer" and G.out_degree(n) == 0]:
            name = G.nodes[nid]["proto"].name
            G.remove_node(nid)
            if self._producer.get(name) == nid:
                del self._producer[name]
            gone.append(name)
        if gone:
            self.dirty = True
            self._after_edit()
        return gone

    # ---- back to ONNX -------------------------------------------------------------------------
    def _by_kind(self, kind: str) -> list:
        items = [(d["order"], d["proto"]) for _, d in self.graph.nodes(data=True) if d["kind"] == kind]
        return [p for _, p in sorted(items, key=lambda x: x[0])]

    def to_graph(self, into: "onnx.GraphProto | None" = None) -> onnx.GraphProto:
        """The GraphProto this view stands for (subgraph bodies rebuilt from their views); built in ``into``
        (an empty GraphProto) when given."""
        g = onnx.GraphProto() if into is None else into
        for field in ("name", "doc_string"):
            if self._shell.HasField(field):
                setattr(g, field, getattr(self._shell, field))
        for nid in self.topological_order():
            d = self.graph.nodes[nid]
            proto = d["proto"]
            if d["subgraphs"] and any(s.dirty for s in d["subgraphs"].values()):
                proto = _with_subgraphs(proto, d["subgraphs"])
            g.node.append(proto)
        inits = self._by_kind("initializer")
        if self._twins:  # an input that only overrode a dropped initializer goes with it
            live = {t.name for t in inits}
            g.input.extend(v for v in self._by_kind("input") if v.name not in self._twins or v.name in live)
        else:
            g.input.extend(self._by_kind("input"))
        if self.model.ir_version < 4:  # IR < 4: every initializer is also a graph input (new ones too)
            have = {v.name for v in g.input}
            g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits if t.name not in have)
        g.output.extend(self._by_kind("output"))
        g.initializer.extend(inits)
        g.sparse_initializer.extend(self._by_kind("sparse_initializer"))
        if self.dirty:
            live = {t for t, n in self._producer.items() if n in self.graph}
            g.value_info.extend(v for v in self._shell.value_info if v.name in live)
            g.quantization_annotation.extend(q for q in self._shell.quantization_annotation if q.tensor_name in live)
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
        copy_fields(self.model, m, skip=("graph",))  # the graph is built in place: the weights are copied once
        self.to_graph(into=m.graph)
        return m


def refresh_edges(cg: "ConvGraph") -> None:
    """Set every edge's ``info`` of ``cg`` (not its bodies) from ``cg.shapes``."""
    shapes, info = cg.shapes, cg.shape_info
    for nbrs in cg.graph._succ.values():  # every edge's data dict, without networkx's per-edge view tuples
        for keys in nbrs.values():
            for d in keys.values():
                t = d["tensor"]
                d["info"] = shapes[t] if t in shapes else info(t)


def _with_subgraphs(node: onnx.NodeProto, subs: dict[str, ConvGraph]) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    for a in n.attribute:
        if a.type == _A.GRAPH and a.name in subs:
            a.g.CopyFrom(subs[a.name].to_graph())
        elif a.type == _A.GRAPHS:
            for j in range(len(a.graphs)):
                a.graphs[j].CopyFrom(subs[f"{a.name}[{j}]"].to_graph())
    return n


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a big graph is built or analyzed (restored after).

    Building a graph allocates millions of small objects that stay alive; each allocation burst
    otherwise triggers a scan of them all that frees nothing (a third of the load time at 20k nodes).
    On the way out the objects made meanwhile go straight to the oldest generation (``gc.freeze()``
    then ``gc.unfreeze()``), so the first collection after the pause does not scan them all either;
    they stay collectable. Nested pauses are free: only the outermost restores.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if not gc.get_freeze_count():  # never unfreeze what the application froze itself
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def save(graph_or_model, path, *, input_path=None, in_place: bool = False) -> Path:
    """Write a ConvGraph or ModelProto atomically (external data beside it above 2 GB)."""
    model = graph_or_model.to_model() if isinstance(graph_or_model, ConvGraph) else graph_or_model
    return write_model(model, path, input_path=input_path, in_place=in_place)


__all__ = ["ConvGraph", "free_names", "gc_paused", "refresh_edges", "save"]
