"""Where the time goes: onnxruntime's profiler, each kernel mapped back to the conv it came from.

The model runs in an onnxruntime session with profiling on (warm-up runs, then N timed runs); the trace
and the session's optimized model go to a temporary folder that is removed afterwards. onnxruntime
rewrites the graph before it runs it, so a kernel's name is not always a conv's. What onnxruntime 1.32
does (read from the optimized models of YOLOv8n, PP-OCR det and the sample models at each level):

- BASIC fuses BatchNormalization, Add and Mul of constants into the conv: the node keeps its name.
- EXTENDED fuses a following activation (Relu, Clip, HardSigmoid...) into ``com.microsoft.FusedConv``:
  the node keeps the conv's name.
- ALL (CPU) moves convs to the NCHWc layout: ``com.microsoft.nchwc.Conv`` named after the output tensor
  of the conv (or of the fused chain) plus ``_nchwc`` (``_token_N`` added when taken), with the Add of a
  residual fused in as its sum input, and ``ReorderInput``/``ReorderOutput`` nodes converting layouts.

So a kernel maps to a conv by: its name, when the model has a node of that name; else ``<tensor>_nchwc``
back through the producers of that tensor (BN, activation...) to the one conv they start from; else its
output tensor, or a weight or bias only one conv reads. A mapped conv kernel must agree with the conv's
group. Nodes with no or duplicate names are given unique ones in the copy onnxruntime runs, so the
mapping never guesses. Reorders are charged apart (``reorder_ms``) to the convs they feed or drain.
On CUDA, kernel times are the GPU's where the trace has CUPTI kernel events; builds without them time the
launch on the host only, which the profile says (``timing``).

Times are medians over the timed runs: the model's run (``time_ms``) and each kernel's. Shares are of
``kernels_ms``, the sum of every kernel's median plus the median time a run spends outside kernels, so they
add up: on a quiet machine it is the median run, on a busy one less (the time other processes take lands on
random kernels, so the median run grows while each kernel's median does not), which a warning says.
"""

from __future__ import annotations

import json
import re
import tempfile
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..run import runtime
from .analyze import Analysis
from ..model.convops import conv_op
from ..errors import ModelError, UsageError
from ..model.graph import ConvGraph
from ..run.inputs import make_inputs

#: Domains of onnxruntime's layout nodes and of its fused convs.
NCHWC = "com.microsoft.nchwc"
REORDERS = frozenset({"ReorderInput", "ReorderOutput"})
#: Ops of an optimized graph that run a convolution.
CONV_KERNELS = frozenset({"Conv", "ConvTranspose", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvInteger",
                          "QLinearConv"})
_NCHWC_NAME = re.compile(r"^(.*)_nchwc(?:_token_\d+)?$")
#: A median run this much longer than its kernels' medians (plus the executor's time) means a busy machine.
BUSY = 1.15
#: How many producers back from an NCHWc node's tensor the conv may be (conv → BN → activation → ...).
_FUSED_DEPTH = 4


@dataclass
class ConvTime:
    """The measured time of one conv: medians over the timed runs, in ms."""

    time_ms: float
    reorder_ms: float
    kernels: list[str]  # the optimized graph's nodes that ran it


@dataclass
class Profile:
    """What :func:`profile` measured: model and conv times (medians over the timed runs, ms)."""

    provider: str
    threads: int | None
    opt_level: str
    warmup: int
    runs: int
    inputs: str
    timing: str  # "kernel": per-kernel times; "host": CUDA launch times only (no GPU kernel events in the trace)
    time_ms: float  # median run time of the model (the profiler's model_run)
    kernels_ms: float  # Σ of every kernel's median + the median time of a run outside kernels: what shares are of
    convs_time_ms: float  # Σ of the convs' time_ms
    reorder_ms: float  # Σ of the NCHWc layout reorders' medians
    other_ms: dict[str, float]  # op type → Σ of the other kernels' medians, largest first
    convs: dict[tuple[str, str], ConvTime] = field(repr=False)  # (graph path, node id) → its time
    unmapped: list[str] = field(default_factory=list)  # conv kernels of the optimized graph no conv claimed
    missing: list[str] = field(default_factory=list)  # convs no kernel ran (onnxruntime folded them away)

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "threads": self.threads, "opt_level": self.opt_level,
                "warmup": self.warmup, "runs": self.runs, "inputs": self.inputs, "timing": self.timing,
                "time_ms": self.time_ms, "kernels_ms": self.kernels_ms, "convs_time_ms": self.convs_time_ms,
                "reorder_ms": self.reorder_ms,
                "other_ms": dict(self.other_ms), "unmapped": list(self.unmapped), "missing": list(self.missing)}

    def warnings(self) -> list[str]:
        out = []
        if self.timing == "host":
            out.append("this onnxruntime records no GPU kernel events (CUPTI): CUDA times are the host's launch "
                       "times of each kernel, not GPU time")
        if self.time_ms > BUSY * self.kernels_ms:
            out.append(f"the machine was busy: the median run took {self.time_ms:.3f} ms, {self.time_ms / self.kernels_ms:.1f}× "
                       f"the {self.kernels_ms:.3f} ms of its kernels' medians; time other processes took lands on "
                       f"random kernels, so per-conv times and shares (of {self.kernels_ms:.3f} ms) leave it out")
        if self.unmapped:
            out.append(f"{len(self.unmapped)} conv kernel(s) of onnxruntime's optimized graph map to no conv "
                       f"(their time is not in any conv's): {', '.join(self.unmapped[:5])}")
        if self.missing:
            out.append(f"{len(self.missing)} conv(s) ran no kernel (onnxruntime folded them away; time 0): "
                       f"{', '.join(self.missing[:5])}")
        return out


# ---- the model onnxruntime runs -----------------------------------------------------------------------
def _named_model(cg: ConvGraph) -> tuple[onnx.ModelProto, dict[str, tuple[ConvGraph, str]]]:
    """The model with every node named uniquely, and name → (graph, node id) for every op."""
    ops = [(g, nid, g.graph.nodes[nid]["proto"]) for g in cg.walk() for nid in g.topological_order()]
    counts: dict[str, int] = defaultdict(int)
    for _, _, proto in ops:
        counts[proto.name] += 1
    names: dict[str, tuple[ConvGraph, str]] = {}
    renamed = []
    try:
        for g, nid, proto in ops:
            name = proto.name
            if not name or counts[name] > 1:
                name = f"convgraph:{g.path}/{nid}"
                renamed.append((proto, proto.name))
                proto.name = name
            names[name] = (g, nid)
        return cg.to_model(), names
    finally:
        for proto, old in renamed:
            proto.name = old


# ---- running it ---------------------------------------------------------------------------------------
def _run(model: onnx.ModelProto, feeds_list, *, provider: str, threads: int | None, opt_level: str, warmup: int,
         runs: int, folder: Path) -> tuple[list[dict], onnx.GraphProto]:
    """Run with onnxruntime's profiler on; the trace's events and the optimized graph (files in ``folder``)."""
    from ..run.bench import _runner  # one complete run: IO binding and a sync on CUDA

    optimized = folder / "optimized.onnx"
    options = {"enable_profiling": True, "profile_file_prefix": str(folder / "trace"),
               "optimized_model_filepath": str(optimized)}
    config = {"session.optimized_model_external_initializers_file_name": "optimized.data",
              "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
    sess = runtime.create_session(model, provider=provider, threads=threads, opt_level=opt_level, config=config,
                                  options=options)
    calls = [_runner(sess, feeds, provider) for feeds in feeds_list]
    for i in range(warmup + runs):
        calls[i % len(calls)]()
    trace = sess.end_profiling()
    try:
        events = json.loads(Path(trace).read_text(encoding="utf-8"))
        graph = onnx.load(str(optimized), load_external_data=False).graph
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:  # pragma: no cover
        raise ModelError(f"cannot read onnxruntime's profile: {runtime.first_line(e)}") from None
    return events, graph


def _node_times(events: list[dict], warmup: int) -> tuple[list[float], list[dict[str, float]], bool]:
    """Model run times (ms) and, per timed run, optimized node name → its kernels' time (ms).

    GPU kernel events (category ``Kernel``, which onnxruntime puts after the node that launched them) replace
    the launching node's host time when the trace has them; the flag says whether it did.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"], e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [r[0] for r in runs]
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    device = any(e.get("cat") == "Kernel" for e in events)
    nested: list[list[tuple[int, int, str, str]]] = [[] for _ in runs]  # per run: (start, end, node, op)
    last = None  # (run index, node name) of the latest node event, for the GPU kernels that follow it
    for e in events:
        cat = e.get("cat")
        if cat == "Node" and e.get("name", "").endswith("_kernel_time"):
            i = bisect_right(starts, e["ts"]) - 1
            if i < 0 or e["ts"] > runs[i][1]:
                last = None
                continue
            last = (i, e["name"][: -len("_kernel_time")])
            if not device:
                nested[i].append((e["ts"], e["ts"] + e["dur"], last[1], (e.get("args") or {}).get("op_name", "")))
            else:
                per_run[i].setdefault(last[1], 0.0)
        elif cat == "Kernel" and last is not None:
            per_run[last[0]][last[1]] += e["dur"] / 1e3
    for i, spans in enumerate(nested):
        for name, us in _self_times(spans).items():
            per_run[i][name] += us / 1e3
    return [r[2] / 1e3 for r in runs[warmup:]], per_run[warmup:], device


#: Ops whose node event spans the nodes of their bodies (onnxruntime times an If as its branch's run).
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _self_times(spans: list[tuple[int, int, str, str]]) -> dict[str, float]:
    """Node name → its time (µs) in one run, an If/Loop/Scan's without the nodes of its bodies (whose own events
    lie inside its span): each moment counted once, for the innermost node running then."""
    spans = sorted(spans)
    own = {j: float(end - start) for j, (start, end, _, _) in enumerate(spans)}
    starts = [sp[0] for sp in spans]
    # innermost control-flow nodes first: an outer If's span holds an inner If's, whose own time is known by then
    for j in sorted((j for j, sp in enumerate(spans) if sp[3] in CONTROL_FLOW), key=lambda j: spans[j][1] - spans[j][0]):
        start, end = spans[j][0], spans[j][1]
        inside = [k for k in range(bisect_left(starts, start), bisect_right(starts, end))
                  if k != j and spans[k][1] <= end and (spans[k][1] - spans[k][0]) <= end - start]
        own[j] = max(own[j] - sum(own[k] for k in inside), 0.0)  # the own times of what ran inside add up
    out: dict[str, float] = defaultdict(float)
    for j, sp in enumerate(spans):
        out[sp[2]] += own[j]
    return out


# ---- mapping kernels to convs -------------------------------------------------------------------------
class _Mapper:
    """Optimized node name → the conv it ran (graph path, node id), from the facts listed in the module doc."""

    def __init__(self, names: dict[str, tuple[ConvGraph, str]], optimized: onnx.GraphProto):
        self.names = names
        self.producer: dict[str, tuple[ConvGraph, str]] = {}
        self.graphs = {g.path: g for g, _ in names.values()}
        self.readers: dict[str, set[tuple[str, str]]] = defaultdict(set)  # constant → convs reading it
        for g, nid in names.values():
            proto = g.graph.nodes[nid]["proto"]
            for t in proto.output:
                if t:
                    self.producer[t] = (g, nid)
            if conv_op(g.graph.nodes[nid]) is not None:
                for t in list(proto.input)[1:]:
                    if t:
                        self.readers[t].add((g.path, nid))
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.made_by: dict[str, onnx.NodeProto] = {}
        self.read_by: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        stack = [optimized]
        while stack:
            graph = stack.pop()
            for n in graph.node:
                self.nodes[n.name] = n
                for t in n.output:
                    self.made_by[t] = n
                for t in n.input:
                    self.read_by[t].append(n)
                stack += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
                stack += [b for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for b in a.graphs]
        self._memo: dict[str, tuple[str, str] | None] = {}

    def conv(self, name: str) -> tuple[str, str] | None:
        """The conv the optimized node ``name`` ran, or None (not a conv, or no conv it can be tied to)."""
        if name not in self._memo:
            self._memo[name] = self._conv(name)
        return self._memo[name]

    def _conv(self, name: str) -> tuple[str, str] | None:
        node = self.nodes.get(name)
        if name in self.names:
            g, nid = self.names[name]
            if conv_op(g.graph.nodes[nid]) is not None and (node is None or self._agrees(node, g, nid)):
                return g.path, nid
            if node is None or node.op_type not in CONV_KERNELS:
                return None
        if node is None or node.op_type not in CONV_KERNELS:
            return None
        m = _NCHWC_NAME.match(name)
        candidates = [self._back(m.group(1))] if m else []
        candidates += [self._back(t) for t in node.output]
        for t in list(node.input)[1:]:
            readers = self.readers.get(t, ())
            candidates.append(next(iter(readers)) if len(readers) == 1 else None)
        for c in candidates:
            if c is not None:
                if self._agrees(node, self.graphs[c[0]], c[1]):
                    return c
        return None

    def _back(self, tensor: str) -> tuple[str, str] | None:
        """The one conv whose output reaches ``tensor`` through at most a few producers (the fused chain)."""
        found, frontier, seen = set(), [tensor], set()
        for _ in range(_FUSED_DEPTH):
            nxt = []
            for t in frontier:
                made = self.producer.get(t)
                if made is None or t in seen:
                    continue
                seen.add(t)
                g, nid = made
                data = g.graph.nodes[nid]
                if conv_op(data) is not None:
                    found.add((g.path, nid))
                elif not data["subgraphs"]:
                    nxt += [i for i in data["proto"].input if i and i in self.producer]
            frontier = nxt
        return found.pop() if len(found) == 1 else None

    @staticmethod
    def _agrees(node: onnx.NodeProto, g: ConvGraph, nid: str) -> bool:
        """The optimized node's group (and strides, where both say) are the conv's; an NCHWc depthwise conv pads
        its channels, so its group, to the SIMD block (8 → 16 on AVX-512)."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in ("group", "strides")}
        orig = g.graph.nodes[nid]["attrs"]
        group, want = int(attrs.get("group", 1)), int(orig.get("group", 1))
        if group != want and not (node.domain == NCHWC and want > 1 and group in (-(-want // b) * b for b in (8, 16))):
            return False
        a, b = attrs.get("strides"), orig.get("strides")
        return not a or not b or [int(v) for v in a] == [int(v) for v in b]

    def reorder_targets(self, name: str) -> list[tuple[str, str]]:
        """The convs a ReorderInput feeds or a ReorderOutput drains (directly)."""
        node = self.nodes.get(name)
        if node is None:
            return []
        if node.op_type == "ReorderInput":
            near = [n for t in node.output for n in self.read_by.get(t, ())]
        else:
            near = [self.made_by[t] for t in node.input if t in self.made_by]
        targets = [self.conv(n.name) for n in near if n.op_type in CONV_KERNELS]
        return list(dict.fromkeys(t for t in targets if t is not None))


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else 0.0


def profile(cg: ConvGraph, inputs=None, *, input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
            provider: str = "cpu", threads: int | None = None, opt_level: str = "all", runs: int = 10,
            warmup: int = 3, input_options: Mapping[str, Any] | None = None) -> Profile:
    """Run ``cg``'s model ``warmup`` + ``runs`` times under onnxruntime's profiler and time each conv.

    ``inputs`` as :func:`convgraph.run.inputs.make_inputs` takes them (None: random, seeded), cycled through
    the runs. Nothing is left on disk: the trace and the optimized model live in a temporary folder.
    """
    from ..run.bench import checked_runs

    provider = provider.lower()
    warmup = checked_runs(runs, warmup, provider)
    model, names = _named_model(cg)
    data = make_inputs(model, inputs, seed=seed, input_shapes=input_shapes or cg.input_shapes or None,
                       **dict(input_options or {}))
    feeds = [data[i] for i in range(min(len(data), runs))]
    with tempfile.TemporaryDirectory(prefix="convgraph-profile-") as tmp:
        events, optimized = _run(model, feeds, provider=provider, threads=threads, opt_level=opt_level,
                                 warmup=warmup, runs=runs, folder=Path(tmp))
    model_ms, per_run, device = _node_times(events, warmup)
    if not model_ms:
        raise ModelError("onnxruntime's profile has no timed run of the model")
    names_run = list(dict.fromkeys(n for run in per_run for n in run))
    node_ms = {n: _median([run.get(n, 0.0) for run in per_run]) for n in names_run}  # each kernel's median
    outside = _median([m - sum(run.values()) for m, run in zip(model_ms, per_run)])  # executor, between kernels
    mapper = _Mapper(names, optimized)
    conv_ms: dict[tuple[str, str], float] = defaultdict(float)
    reorder_ms: dict[tuple[str, str], float] = defaultdict(float)
    kernels: dict[tuple[str, str], list[str]] = defaultdict(list)
    other: dict[str, float] = defaultdict(float)
    reorders = 0.0
    unmapped = []
    for name, ms in node_ms.items():
        node = mapper.nodes.get(name)
        op = node.op_type if node is not None else "?"
        if node is not None and op in REORDERS and node.domain == NCHWC:
            reorders += ms
            targets = mapper.reorder_targets(name)
            for t in targets:
                reorder_ms[t] += ms / len(targets)
            continue
        key = mapper.conv(name)
        if key is not None:
            conv_ms[key] += ms
            kernels[key].append(name)
            continue
        if op in CONV_KERNELS:
            unmapped.append(name)
        other[op] += ms
    convs = {}
    missing = []
    for g in cg.walk():
        for nid in g.topological_order():
            if conv_op(g.graph.nodes[nid]) is not None:
                key = (g.path, nid)
                if key not in kernels and not g.path:
                    missing.append(nid)
                convs[key] = ConvTime(conv_ms.get(key, 0.0), reorder_ms.get(key, 0.0), kernels.get(key, []))
    return Profile(provider=provider, threads=threads, opt_level=opt_level, warmup=warmup, runs=runs,
                   inputs=data.describe, timing="host" if provider == "cuda" and not device else "kernel",
                   time_ms=_median(model_ms), kernels_ms=sum(node_ms.values()) + max(outside, 0.0),
                   convs_time_ms=sum(c.time_ms for c in convs.values()), reorder_ms=reorders,
                   other_ms=dict(sorted(other.items(), key=lambda kv: -kv[1])), convs=convs,
                   unmapped=list(unmapped), missing=missing)


def attach(analysis: Analysis, prof: Profile, roofline=None) -> None:
    """Give each record of ``analysis`` its measured time, share, GMAC/s and gap to ``roofline``; totals too."""
    for r in analysis.convs:
        t = prof.convs.get((r.graph, r.node_id))
        if t is None:
            continue
        r.time_ms, r.reorder_ms = t.time_ms, t.reorder_ms
        r.time_share = t.time_ms / prof.kernels_ms if prof.kernels_ms > 0 else None
        r.gmacs = r.macs / t.time_ms / 1e6 if r.macs is not None and t.time_ms > 0 else None
        least = roofline.least_ms(r.macs, None if r.weight_bytes is None or r.activation_bytes is None
                                  else r.weight_bytes + r.activation_bytes) if roofline is not None else None
        r.roofline_gap = t.time_ms / least if least and t.time_ms > 0 else None
        for opt in r.rewrites:
            opt.time_saved_ms = saved_ms(t.time_ms, r.macs, opt.macs_after)
    analysis.profile = prof
    analysis.totals.update(time_ms=prof.time_ms, kernels_ms=prof.kernels_ms, convs_time_ms=prof.convs_time_ms,
                           reorder_ms=prof.reorder_ms)


def saved_ms(time_ms: float | None, macs: int | None, macs_after: int | None) -> float | None:
    """An estimate of the time a rewrite saves: the conv's measured time × its MAC saving (time_ms × (1 − after/before)).

    Only an estimate: depthwise and pointwise convs are memory-bound, so the speed realized is often less
    (`convgraph optimize` measures it)."""
    if time_ms is None or not macs or macs_after is None:
        return None
    return time_ms * (1 - macs_after / macs)


def change_estimates(cg: ConvGraph, changes, **kwargs) -> tuple[Profile, list[dict[str, Any]]]:
    """Profile ``cg`` (kwargs as :func:`profile`) and estimate each rewrite change's time saved.

    ``changes``: :class:`convgraph.engine.rewrite_report.Change` items (node label, graph, MACs before and after). Returns
    the profile and, per change, ``{"node", "rule", "time_ms", "saved_ms_estimate"}``.
    """
    prof = profile(cg, **kwargs)
    times: dict[tuple[str, str], float] = {}
    for g in cg.walk():
        for nid, t in ((nid, prof.convs.get((g.path, nid))) for nid in g.topological_order()):
            if t is not None:
                times[(g.path, g.graph.nodes[nid]["proto"].name or nid)] = t.time_ms
    out = []
    made: dict[tuple[str, str], tuple[float | None, int | None]] = {}  # a node an earlier change made -> the
    # measured time and MACs of the original conv it came from (two rules in a row: separable, then low-rank
    # on its pointwise half)
    for c in changes:
        ms = times.get((c.graph, c.node))
        if ms is None and (c.graph, c.node) in made:  # its share of the original conv's time, by MACs
            t0, m0 = made[(c.graph, c.node)]
            ms = t0 * c.macs_before / m0 if t0 is not None and m0 and c.macs_before is not None else None
        origin = made.get((c.graph, c.node), (ms, c.macs_before))
        for n in c.new_nodes:
            made[(c.graph, n)] = origin
        out.append({"node": c.node, "rule": c.rule, "time_ms": ms, "saved_ms_estimate": saved_ms(ms, c.macs_before,
                                                                                                    c.macs_after)})
    return prof, out


def pyplot():
    """matplotlib's pyplot (Agg backend), or a UsageError naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'convgraph[plot]'") from None
    return plt


def plot(analysis: Analysis, path, top: int = 20) -> None:
    """A PNG bar chart of the ``top`` convs by measured time: share of the model's time beside share of its MACs."""
    plt = pyplot()
    import io as _io

    from ..io import atomic_write_bytes

    if analysis.profile is None:
        raise UsageError("--plot draws measured times: profile the model first (--profile)")
    total = analysis.totals.get("macs")
    timed = sorted(((r.time_share, r) for r in analysis.convs if r.time_share is not None), key=lambda p: -p[0])[:top]
    rs = [r for _, r in timed]
    names = [(r.name or r.node_id)[-40:] for r in rs][::-1]
    time_pct = [100 * share for share, _ in timed][::-1]
    mac_pct = [100 * r.macs / total if r.macs is not None and total else 0.0 for r in rs][::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(rs), 1)), dpi=120)
    y = np.arange(len(rs))
    ax.barh(y + 0.2, time_pct, height=0.4, color="#d62728", label="share of measured time")
    ax.barh(y - 0.2, mac_pct, height=0.4, color="#7f7f7f", label="share of MACs")
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlabel("% of the model")
    p = analysis.profile
    threads = "default threads" if p.threads is None else f"{p.threads} thread{'s' * (p.threads != 1)}"
    ax.set_title(f"top {len(rs)} convs by time ({p.provider}, {threads}): shares of {p.kernels_ms:.2f} ms, the "
                 f"kernels' medians (median run {p.time_ms:.2f} ms)", fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
