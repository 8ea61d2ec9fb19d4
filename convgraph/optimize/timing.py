"""Candidates: every rule × rank that matches a conv and cuts its MACs, each timed as a one-layer model (or as the
subgraph a rule's match spans)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..engine.calibrate import calibratable
from ..errors import CheckFailed, UsageError
from ..model.graph import ConvGraph
from ..io import atomic_write_bytes
from ..model.record import ConvRecord
from ..registry import get_rule
from ..engine.rewrite import Selection, rewrite
from ..rule import RuleContext, Skip
from .int8 import int8_replacement, quantizes
from .report import INT8_CALIBRATION, KEEP_SHARES, LAYER_RANK_SHARES, MAX_MAC_RATIO, Candidate


# ---- candidates and per-layer latency -----------------------------------------------------------------------
def rule_options(rule_name: str, rec: ConvRecord, ranks: Sequence[int],
                  shares: Sequence[str] | None = None) -> list[dict[str, Any]]:
    rule = get_rule(rule_name)
    if quantizes(rule):
        return [{"calibration": INT8_CALIBRATION}]
    if rule_name in KEEP_SHARES:
        return [{"keep": k} for k in KEEP_SHARES[rule_name]]
    if rule_name in LAYER_RANK_SHARES:
        return [{"rank": r} for r in (shares or LAYER_RANK_SHARES[rule_name])]
    if any(p.name == "rank" for p in rule.params):
        return [{"rank": r} for r in ranks]
    return [{}]


def layer_model(cg: ConvGraph, rec: ConvRecord, nodes: Sequence[onnx.NodeProto],
                 inits: Sequence[onnx.TensorProto], outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """A model of just ``nodes`` (the conv or its replacement; or the nodes a rule's match spans, or their
    replacement): inputs the conv's input and any other tensor they read that is not a constant (random data
    when timed), outputs ``outputs`` (default: the conv's output); constants become initializers."""
    produced = {o for n in nodes for o in n.output}
    have = {t.name for t in inits}
    extra, inputs = [], [rec.input]
    for n in nodes:
        for t in n.input:
            if t and t not in produced and t not in have and t not in inputs:
                v = RuleContext(cg).value(t)
                if v is None:
                    inputs.append(t)
                else:
                    extra.append(onnx.numpy_helper.from_array(v, t))
                    have.add(t)
    elem = cg.shapes[rec.input].elem_type if rec.input in cg.shapes else onnx.TensorProto.FLOAT

    def info(t: str) -> onnx.ValueInfoProto:
        if t in (rec.input, rec.output):
            return onnx.helper.make_tensor_value_info(t, elem, list((rec.input_shape if t == rec.input else
                                                                    rec.output_shape) or ()))
        got = cg.shape_info(t)
        if got is None or got.shape is None or not _static(got.shape):
            raise UsageError(f"conv {rec.node_id}: tensor {t!r} has no static shape; cannot time the layers alone")
        return onnx.helper.make_tensor_value_info(t, got.elem_type, list(got.shape))

    graph = onnx.helper.make_graph(list(nodes), "layer", [info(t) for t in inputs],
                                   [info(t) for t in (outputs or [rec.output])], list(inits) + extra)
    model = onnx.helper.make_model(graph, opset_imports=list(cg.model.opset_import))
    model.ir_version = cg.model.ir_version
    return model


def in_context(layer: onnx.ModelProto) -> onnx.ModelProto:
    """``layer`` between float neighbours: a depthwise 1×1 conv before each float activation it reads and after
    each it makes (rank ≥ 3, channels known). Timed alone, a float conv pays onnxruntime's reorders into and out
    of its blocked layout (NCHWc), which it does not pay among float neighbours, and an int8 conv does not pay
    the reorders at its boundaries, which it does among them: one-layer timings made int8 look better than in
    the model (YOLOv8n ``/model.4/m.1/cv2``: 0.09–0.10 ms saved alone, 0.06 between depthwise convs, −0.02–0.03
    measured in the model; ``/model.16``: 0.11, 0.06–0.07, 0.04–0.06). The neighbours cost every option alike."""
    m = onnx.ModelProto()
    m.CopyFrom(layer)
    g = m.graph

    def channels(v: onnx.ValueInfoProto) -> int | None:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        ok = t.elem_type == onnx.TensorProto.FLOAT and len(dims) >= 3 and dims[1] > 0
        return dims[1] if ok else None

    def neighbour(x: str, y: str, c: int, rank: int, name: str) -> onnx.NodeProto:
        w = onnx.numpy_helper.from_array(np.full((c, 1) + (1,) * (rank - 2), 0.5, np.float32), f"{name}/W")
        g.initializer.append(w)
        return onnx.helper.make_node("Conv", [x, w.name], [y], name=name, group=c)

    before: list[onnx.NodeProto] = []
    after: list[onnx.NodeProto] = []
    for side, values, into in (("in", g.input, before), ("out", g.output, after)):
        for k, v in enumerate(values):
            c = channels(v)
            if c is None:
                continue
            inner = f"context/{side}{k}"
            for n in g.node:  # the layer reads (and, for an output, makes) the neighbour's side of it
                n.input[:] = [inner if t == v.name else t for t in n.input]
                if side == "out":
                    n.output[:] = [inner if t == v.name else t for t in n.output]
            x, y = (v.name, inner) if side == "in" else (inner, v.name)
            into.append(neighbour(x, y, c, len(v.type.tensor_type.shape.dim), f"context/{side}{k}/conv"))
    nodes = before + list(g.node) + after
    del g.node[:]
    g.node.extend(nodes)
    return m


def span_outputs(cg: ConvGraph, span: Sequence[str]) -> list[str]:
    """The tensors the nodes ``span`` make that something else reads (or that are graph outputs)."""
    inside = set(span)
    return [t for n in span for t in cg.node(n).output if t and any(c not in inside for c in cg.consumers(t))]


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


class TimingCache:
    """One-layer timings kept across runs in a small JSON file (default under the user's cache folder).

    An entry is a conv and all the options timed with it, interleaved: the original layer's median and,
    per option, its median over the pairs and the share of pairs it won. The key is a digest of the
    layers' structure — ops, attributes, shapes and dtypes of every tensor, weights' shapes but not their
    values, which do not change a dense kernel's time; names replaced by their order — with the provider,
    thread count, timed runs, onnxruntime version, processor and core count: another machine, setting or
    layer never matches."""

    VERSION = 1

    def __init__(self, path):
        self.path = Path(os.fspath(path))
        try:
            data = json.loads(self.path.read_text())
            self.entries = data["entries"] if data.get("version") == self.VERSION else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}
        self.hits = self.misses = 0

    @staticmethod
    def default_path() -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "convgraph" / "layer-timings.json"

    @staticmethod
    def key(layers: Sequence[onnx.ModelProto], provider: str, threads: int | None, runs: int) -> str:
        import hashlib
        import platform

        from ..run.runtime import ort

        h = hashlib.sha256()
        for m in layers:
            shell = onnx.ModelProto()
            shell.CopyFrom(m)
            g = shell.graph
            names: dict[str, str] = {}  # tensors renamed by first appearance: builds name them afresh each time

            def canon(t: str) -> str:  # called within this iteration only
                return names.setdefault(t, f"t{len(names)}") if t else t  # noqa: B023

            for vi in list(g.input) + list(g.output):
                vi.name = canon(vi.name)
            for t in g.initializer:  # shapes and dtypes stay; values go
                t.name = canon(t.name)
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data",
                          "data_location"):  # a big weight may refer to its bytes on disk: where is no part of the key
                    t.ClearField(f)
            for n in g.node:
                n.name, n.doc_string = "", ""
                n.input[:] = [canon(t) for t in n.input]
                n.output[:] = [canon(t) for t in n.output]
            h.update(shell.SerializeToString(deterministic=True))
            h.update(b"\0")
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
        except OSError:
            pass
        h.update(json.dumps([provider, threads, runs, ort().__version__, cpu, os.cpu_count()]).encode())
        return h.hexdigest()

    def get(self, key: str) -> dict | None:
        hit = self.entries.get(key)
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps({"version": self.VERSION, "entries": self.entries}).encode())
        except OSError:
            pass  # a cache that cannot be written costs time, never a result


def candidates(cg: ConvGraph, records: Sequence[ConvRecord], rules: Sequence[str], ranks: Sequence[int], *,
               shares: Sequence[str] | None = None,
               provider: str, threads: int | None, runs: int, warmup: int,
               progress=None, cache: TimingCache | None = None, stop=None) -> list[Candidate]:
    """Every matching (conv, rule, params) that cuts MACs, with its measured one-layer latency (from
    ``cache`` when the same layers were timed before in the same setting). A rule whose match spans more
    than the conv (``prune``: the conv, the per-channel ops after it, its consumer convs) is timed as that
    subgraph against its replacement: its saving is the subgraph's time before minus after. The convs are
    timed the largest (MACs) first, and ``stop()`` true ends the timing: the convs timed so far count."""
    from ..run.bench import bench

    by_id = {r.node_id: r for r in records}
    out: list[Candidate] = []
    t_start = time.perf_counter()
    order = {r.node_id: i for i, r in enumerate(records)}
    for done, rec in enumerate(sorted(records, key=lambda r: -(r.macs if isinstance(r.macs, int) else 0))):
        if stop is not None and stop():
            break
        if not (_static(rec.input_shape) and _static(rec.output_shape)):
            raise UsageError(f"conv {rec.node_id} has dynamic shapes {rec.input_shape} → {rec.output_shape}; "
                             "fix the input shape (--input-shape) to time its layers")
        options: list[dict[str, Any]] = []
        for name in rules:
            rule = get_rule(name)
            for given in rule_options(name, rec, ranks, shares):
                params = rule.resolve_params({k: str(v) for k, v in given.items()})
                ctx = RuleContext(cg, by_id, None, params)
                why, found = rule.check(rec, ctx)
                if why is not None:
                    break  # the rule does not apply to this conv (whatever the rank)
                macs, _, kind = rule.estimate(rec, params) if rule.estimate else (None, 0, "")
                if macs is not None and rec.macs and macs > MAX_MAC_RATIO * rec.macs and not quantizes(rule):
                    continue  # int8 keeps the MACs and saves time by its kernels
                try:
                    rep = int8_replacement(cg, rec, params, None) if quantizes(rule) else rule.make(
                        rec, ctx, params, found)
                except (Skip, np.linalg.LinAlgError):
                    break  # non-finite weights, a singular fit: this conv is left alone
                if any(o.get("rule") == name and o["macs"] == rep.macs_after for o in options):
                    continue  # the rank was capped: same layer as one already listed
                # a match spanning more than the conv is timed as the subgraph it spans, in graph order
                span = tuple(sorted(found.nodes, key=lambda n: cg.graph.nodes[n]["order"])) if found else (rec.node_id,)
                options.append({"rule": name, "params": given, "kind": rep.kind_after, "macs": rep.macs_after,
                                "span": span, "rep": rep})
        spans: dict[tuple[str, ...], list[dict]] = {}
        for o in options:
            spans.setdefault(o["span"], []).append(o)
        for span, opts in spans.items():  # each span timed against its own original, interleaved
            outs = span_outputs(cg, span) if len(span) > 1 else []
            layers = [layer_model(cg, rec, [cg.node(n) for n in span], [], outs)] + [
                layer_model(cg, rec, o["rep"].nodes, o["rep"].initializers, outs) for o in opts]
            if any(quantizes(get_rule(o["rule"])) for o in opts):  # int8 changes the layout: time among floats
                layers = [in_context(m) for m in layers]
            key = TimingCache.key(layers, provider, threads, runs) if cache is not None else ""
            timed = cache.get(key) if cache is not None else None
            if timed is None:
                got = bench(layers, runs=runs, warmup=warmup, provider=provider, threads=threads,
                            names=["original"] + [f"{o['rule']}{o['params']}" for o in opts], progress=False,
                            spinning=False)
                base = np.asarray(got.models[0].times_ms)
                timed = {"before_ms": got.models[0].median_ms,
                         "ratios": [r.median for r in got.ratios],  # medians over interleaved pairs
                         "won": [float(np.mean(base > np.asarray(m.times_ms))) for m in got.models[1:]]}
                if cache is not None:
                    cache.put(key, timed)
            t0 = timed["before_ms"]
            for o, ratio, won in zip(opts, timed["ratios"], timed["won"]):
                before = o["rep"].macs_before if len(span) > 1 and o["rep"].macs_before is not None else rec.macs
                out.append(Candidate(rec.node_id, o["rule"], o["params"], o["kind"], before, o["macs"], t0,
                                     t0 / ratio, faster_share=won, touches=list(span) if len(span) > 1 else []))
        if progress is not None:
            progress(f"timing layers: {done + 1}/{len(records)} convs{eta(t_start, done + 1, len(records))}")
    return sorted(out, key=lambda c: order[c.node])


def stats_needed(cg: ConvGraph, by_id: Mapping[str, ConvRecord], node: str, rule: str, params: Mapping) -> list[str]:
    """The convs of ``by_id`` whose calibration statistics a rewrite of ``node`` by ``rule`` fits on
    (:meth:`convgraph.rule.Rule.calibrate_nodes`: the conv's own, ``prune``'s its consumers'), those that can
    be calibrated; none for a rule that quantizes (it needs activation ranges instead)."""
    r = get_rule(rule)
    if quantizes(r):
        return []
    ctx = RuleContext(cg, dict(by_id), None, r.resolve_params({k: str(v) for k, v in params.items()}))
    return [n for n in r.calibrate_nodes(by_id[node], ctx) if n in by_id and calibratable(by_id[n]) is None]


def eta(t_start: float, done: int, total: int) -> str:
    """``, about N s left`` at the rate so far (empty when nothing is left or known)."""
    if done <= 0 or done >= total:
        return ""
    left = (time.perf_counter() - t_start) / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


def unique_names(cg: ConvGraph) -> dict[str, str]:
    """Name every main-graph op after its node id where the two differ (unnamed ops, repeated names), so
    that ids survive rewriting and reloading (an unnamed op's id is its position, a repeated name's its
    rank among the repeats: both move when other nodes are rewritten). Edits ``cg``; returns id → the
    original name, for :func:`restore_names`."""
    renamed = {}
    for nid in cg.ops():
        proto = cg.node(nid)
        if proto.name != nid:
            renamed[nid] = proto.name
            proto.name = nid
    if renamed:
        cg.dirty = True
    return renamed


def restore_names(model: onnx.ModelProto, renamed: Mapping[str, str]) -> onnx.ModelProto:
    """Make the ops :func:`unique_names` named unnamed again; repeated names are not restored
    (onnxruntime refuses a model with two nodes of one name)."""
    for n in model.graph.node:
        if renamed.get(n.name) == "":
            n.name = ""
    return model


def apply_plan(model: onnx.ModelProto, plan: Mapping[str, tuple[str, dict]], *, calibration, input_shapes):
    """``model`` with each conv of ``plan`` (node id → (rule, params)) rewritten; returns (model, changes).

    The plan's ids must be the names of its convs, once each (:func:`unique_names`); what the engine
    applied is compared with the plan, and a difference is an error naming the nodes."""
    names: dict[str, int] = {}
    for n in model.graph.node:
        names[n.name] = names.get(n.name, 0) + 1
    unnamed = sorted(n for n in plan if names.get(n) != 1)
    if unnamed:
        raise UsageError(f"plan names node(s) that are not one uniquely named op of the model: {', '.join(unnamed)}")
    groups: dict[tuple[str, str], list[str]] = {}
    for node, (rule, params) in plan.items():
        groups.setdefault((rule, repr(sorted(params.items()))), []).append(node)
    changes = []
    for (rule, _), nodes in groups.items():
        params = plan[nodes[0]][1]
        res = rewrite(model, [rule], params={k: str(v) for k, v in params.items()},
                      selection=Selection(node_ids=frozenset(nodes)), input_shapes=input_shapes, verify=False,
                      calibration=calibration)
        applied = [c.node for c in res.report.changes if c.rule == rule]
        missing = sorted(set(nodes) - set(applied))
        extra = sorted(set(c.node for c in res.report.changes) - set(nodes))
        if missing or extra or len(applied) != len(nodes):
            why = {e.node: e.reason for e in res.report.explain if e.node in missing and not e.applies}
            raise CheckFailed("the rewrite differs from the plan: " + "; ".join(
                [f"{rule} not applied to {n} ({why.get(n, 'no reason given')})" for n in missing]
                + [f"{n} rewritten though not planned for {rule}" for n in extra]
                + ([f"{rule} applied {len(applied)} time(s) to {len(nodes)} planned node(s)"]
                   if not (missing or extra) else [])))
        if res.model is None:
            raise CheckFailed(f"{rule} wrote no model for {', '.join(nodes)}")
        model = res.model
        changes += res.report.changes
    return model, changes
