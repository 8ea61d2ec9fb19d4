"""Localization: the first node of a candidate model whose output leaves tolerance, and why.

Runs both models once more with the intermediate tensors they share exposed (in chunks of at most
:data:`LOCALIZE_CHUNK_BYTES`), compares them in topological order, walks back from the first tensor out of
tolerance to the shared tensors it reads, and names the rewrite (from the candidate's rewrite record)
that made the nodes in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..run import runtime
from ..model.graph import ConvGraph
from ..run.metrics import Accumulator, Metrics, Tolerance
from ..progress import staged

#: Localization exposes intermediates in chunks of at most this many bytes per model and run.
LOCALIZE_CHUNK_BYTES = 512 * 2**20


@dataclass
class Localization:
    """Where the candidate starts to differ (one sample, shared intermediate tensors)."""

    sample: int
    compared: int  # shared intermediate tensors compared
    shared: int  # intermediate tensors of the candidate with a counterpart in the reference
    unmatched: int  # intermediate tensors only the candidate has (new tensors of a rewrite)
    first_divergent_node: str | None = None
    first_divergent_op: str | None = None
    first_divergent_tensor: str | None = None
    first_divergent_origin: str | None = None
    rewrite: dict | None = None  # the rewrite record entry that made the node, when the metadata has one
    region: list[str] = field(default_factory=list)  # candidate nodes between the inputs and the tensor
    tensor: Metrics | None = None
    inputs: list[dict] = field(default_factory=list)  # the shared tensors it reads, with their metrics
    divergent: int = 0  # tensors out of tolerance among those compared
    shown_at_node: str | None = None  # an unchanged node whose output first left tolerance (error from upstream)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensor"] = self.tensor.to_dict() if self.tensor else None
        return d


def _activations(cg: ConvGraph) -> dict[str, str]:
    """Tensors of the main graph that depend on a graph input (not weights), in topological order → producer."""
    G, dep, out = cg.graph, set(), {}
    for nid in cg.topological_order():
        if any(G.nodes[u]["kind"] == "input" or u in dep for u, _ in G.in_edges(nid)):
            dep.add(nid)
            for t in G.nodes[nid]["proto"].output:
                if t:
                    out[t] = nid
    return out


def _nbytes(cg: ConvGraph, t: str) -> int | None:
    info = cg.shapes.get(t)
    if info is None or info.shape is None or not info.static or not info.elem_type:
        return None
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(info.shape) * item


def _chunks(pairs: list[tuple[str, str]], cand: ConvGraph, budget: int) -> list[list[tuple[str, str]]]:
    sizes = [_nbytes(cand, c) for c, _ in pairs]
    fallback = max([s for s in sizes if s is not None], default=0)
    chunks, used = [], 0
    cur: list[tuple[str, str]] = []
    for pair, s in zip(pairs, sizes):
        s = fallback if s is None else s
        if cur and used + s > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(pair)
        used += s
    if cur:
        chunks.append(cur)
    return chunks


def _changed(ref_cg: ConvGraph, cand_cg: ConvGraph, nid: str, tensor_map: Mapping[str, str], new_names: set) -> bool:
    """Whether candidate node ``nid`` may compute something else than the reference node making the same
    tensor: made by a rewrite, or another op, attributes, inputs or constant input values."""
    from ..model.weights import constant_value

    node = cand_cg.node(nid)
    if (node.name or nid) in new_names or nid in new_names or not node.output:
        return True
    ref_id = ref_cg.producer(tensor_map.get(node.output[0], node.output[0]))
    if ref_id is None or ref_cg.graph.nodes[ref_id]["kind"] != "op":
        return True
    ref = ref_cg.node(ref_id)
    if (node.op_type, node.domain) != (ref.op_type, ref.domain) or list(node.attribute) != list(ref.attribute):
        return True
    if [tensor_map.get(t, t) for t in node.input] != list(ref.input):
        return True
    for a, b in zip(node.input, ref.input):
        va, vb = constant_value(cand_cg, a), constant_value(ref_cg, b)
        if (va is None) != (vb is None) or (va is not None and vb is not None and not np.array_equal(va, vb)):
            return True
    return False


def _culprit(ref_cg: ConvGraph, cand_cg: ConvGraph, node: str, active: set[str], tensor_map: Mapping[str, str],
             new_names: set) -> str:
    """The node to blame for a divergence first seen at ``node``'s output: ``node`` itself when it was
    changed; else (an unchanged node only carries the error its inputs bring, amplified) the nearest changed
    node upstream of it, in the tensors that depend on the inputs."""
    if _changed(ref_cg, cand_cg, node, tensor_map, new_names):
        return node
    G = cand_cg.graph
    found, seen, stack = [], {node}, [node]
    while stack:
        for u in G.predecessors(stack.pop()):
            if u in seen or u not in active:
                continue
            seen.add(u)
            if _changed(ref_cg, cand_cg, u, tensor_map, new_names):
                found.append(u)
            else:
                stack.append(u)
    if not found:
        return node
    order = {n: i for i, n in enumerate(cand_cg.topological_order())}
    return max(found, key=order.__getitem__)


@staged("localizing")
def first_divergence(ref_model, cand_model, ref_cg: ConvGraph, cand_cg: ConvGraph, ref_feeds, cand_feeds,
                     sample: int, tol: Tolerance, tensor_map: Mapping[str, str], record: dict | None,
                     run_opts: dict) -> Localization:
    """Localize on one ``sample`` (feeds cast for each model): the first divergent node, its region and origin."""
    ref_act, cand_act = _activations(ref_cg), _activations(cand_cg)
    pairs: list[tuple[str, str]] = []  # (candidate tensor, reference tensor) in the candidate's order
    for t in cand_act:
        r = tensor_map.get(t, t)
        if r in ref_act:
            pairs.append((t, r))
    shared = {c for c, _ in pairs}
    loc = Localization(sample=sample, compared=0, shared=len(pairs), unmatched=len(cand_act) - len(pairs))
    metrics: dict[str, Metrics] = {}
    first: str | None = None
    for chunk in _chunks(pairs, cand_cg, LOCALIZE_CHUNK_BYTES):
        ref_names, cand_names = [r for _, r in chunk], [c for c, _ in chunk]
        rs = runtime.create_session(runtime.expose_tensors(ref_model, ref_names, ref_cg.shapes), **run_opts)
        ref_vals = dict(zip(ref_names, runtime.run(rs, ref_feeds, ref_names)))
        del rs
        cs = runtime.create_session(runtime.expose_tensors(cand_model, cand_names, cand_cg.shapes), **run_opts)
        cand_vals = dict(zip(cand_names, runtime.run(cs, cand_feeds, cand_names)))
        del cs
        for c, r in chunk:
            rv, cv = ref_vals.pop(r, None), cand_vals.pop(c, None)
            if not isinstance(rv, np.ndarray) or not isinstance(cv, np.ndarray):
                continue  # sequences and maps are not compared
            acc = Accumulator(c, tol)
            acc.update(rv, cv)
            m = acc.result()
            metrics[c] = m
            loc.compared += 1
            if not m.passed and not m.inconclusive:  # a tensor that says nothing here (all ~0) shows no divergence
                loc.divergent += 1
                first = first or c
        del ref_vals, cand_vals
        if first is not None:
            break
    if first is None:
        return loc
    node = cand_act[first]
    G = cand_cg.graph
    new_names = {n for e in (record or {}).get("rewrites", []) for n in (e.get("new_nodes") or [])}
    culprit = _culprit(ref_cg, cand_cg, node, set(cand_act.values()), tensor_map, new_names)
    if culprit != node:
        loc.shown_at_node, node = node, culprit
    loc.first_divergent_node, loc.first_divergent_tensor = node, first
    loc.first_divergent_op = G.nodes[node]["op_type"]
    loc.tensor = metrics[first]
    # walk back through tensors only the candidate has, to the shared tensors (or graph inputs) it reads
    region, seen, frontier, stack = [node], {node}, {}, [node]
    while stack:
        for u, _, d in G.in_edges(stack.pop(), data=True):
            t, kind = d["tensor"], G.nodes[u]["kind"]
            if kind == "input":
                frontier[t] = {"tensor": t, "graph_input": True}
            elif t in shared:
                got = metrics.get(t)
                frontier[t] = {"tensor": t, "passed": got.passed if got else None,
                               "max_abs_err": got.max_abs_err if got else None, "cosine": got.cosine if got else None}
            elif kind == "op" and t in cand_act and u not in seen:
                seen.add(u)
                region.append(u)
                stack.append(u)
    order = {n: i for i, n in enumerate(cand_cg.topological_order())}
    loc.region = sorted(region, key=order.__getitem__)
    loc.inputs = list(frontier.values())
    if record:
        names = {cand_cg.node(n).name or n for n in loc.region}
        for entry in record.get("rewrites", []):
            new = set(entry.get("new_nodes", []) or [])
            if new & names or new & set(loc.region):
                loc.rewrite = entry
                old = list(entry.get("old_nodes", []) or [])
                convs = [o for o in old if o in ref_cg.graph and ref_cg.graph.nodes[o].get("op_type", "").endswith(
                    ("Conv", "ConvTranspose", "ConvInteger"))]
                loc.first_divergent_origin = (convs or old or [None])[0]
                break
    return loc
