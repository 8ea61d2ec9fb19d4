"""Error-budgeted optimization: choose, per conv, the rewrite that buys the most measured speed for the least
model-level error, fit it on calibration data, and prove the result on held-out inputs.

1. **Candidates.** Every selected conv × every given rule that matches it × each rank (``ranks``) or the
   rule's defaults, keeping those that cut MACs.
2. **Latency, measured.** Each conv and its candidate replacements run as one-layer models in
   onnxruntime, interleaved (:func:`convgraph.bench.bench`); a candidate's saving is the layer's measured
   time before minus after (MAC counts mislead: depthwise convs are memory-bound).
3. **Error, measured.** Each candidate alone, fitted on the calibration statistics of the original
   model (:mod:`convgraph.calibrate`, :mod:`convgraph.fit`), is run on a few calibration inputs and its
   model-level output error recorded (1 − cosine, or noise/signal power for ``snr``).
4. **Greedy.** Per conv the options form a chain of increasingly aggressive steps (the lower convex
   hull of error against saving); all steps are ordered by saving per unit of error. The prefix whose
   predicted error (errors add) fits the budget is the first guess.
5. **Sequential fit, check, back-off.** A prefix is built layer by layer in topological order, each conv
   fitted on the activations of the model rewritten so far against the original's outputs (cross
   moments), and judged on the held-out inputs; the longest prefix within the budget is found by
   bisection, and a step that alone turns a passing prefix into a failing one is backed off and the
   search goes on past it (:func:`search`). Every evaluated prefix is also timed: the measured
   error–latency front.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import networkx as nx
import numpy as np
import onnx

from .analyze import analyze
from .calibrate import Calibration, calibratable, calibrate
from .errors import CheckFailed, UsageError
from .graph import ConvGraph, load
from .inputs import InputSet, make_inputs
from .io import atomic_write_bytes, check_output_path
from .profile import pyplot
from .record import ConvRecord
from .registry import get_rule
from .rewrite import Selection, rewrite
from .rule import RuleContext

METRICS = ("cosine", "snr", "top1")
DEFAULT_RULES = ("separable", "spatial-separable", "dilated", "low-rank")
#: Ranks tried for rules that take one.
DEFAULT_RANKS = (1, 2, 3, 4)
#: Ranks tried instead of ``ranks`` for rules whose rank spans the whole layer (R channels shared by all, where
#: ``ranks`` count filters per input channel): shares of the rule's full rank; for a square 3×3 conv in
#: low-rank's spatial form they cost about 1/8, 1/4, 1/2, 3/4 and 1× the MACs (the last is dropped by MAX_MAC_RATIO).
LAYER_RANK_SHARES = {"low-rank": ("1/16", "1/8", "1/4", "3/8", "1/2")}
#: A built prefix this much slower than its predicted latency has non-additive savings: shorter ones are tried.
PREDICTION_SLACK = 1.1
#: Built prefixes whose measured speed-ups differ by less than this share count as equally fast.
SPEED_NOISE = 0.01
#: A candidate is kept only when its MACs are at most this fraction of the conv's.
MAX_MAC_RATIO = 0.8
#: A candidate layer counts as faster only when it beat the original in at least this share of the
#: interleaved pairs: a median saving that load on a shared machine can flip is no saving.
STABLE_SHARE = 0.75
#: Errors below this count as this much in saving/error ratios (exact-looking candidates).
ERROR_FLOOR = 1e-7


@dataclass
class Candidate:
    """One possible rewrite of one conv, measured alone."""

    node: str
    rule: str
    params: dict[str, Any]
    kind_after: str
    macs_before: int | None
    macs_after: int | None
    layer_ms_before: float
    layer_ms_after: float
    error: float | None = None  # model-level error with this rewrite alone (calibration inputs)
    metric: float | None = None  # the metric with this rewrite alone
    faster_share: float | None = None  # share of the interleaved pairs in which this layer beat the original

    @property
    def saving_ms(self) -> float:
        return self.layer_ms_before - self.layer_ms_after

    def to_dict(self) -> dict:
        return {**asdict(self), "saving_ms": self.saving_ms}


@dataclass
class Step:
    """One move of the greedy sequence: conv ``node`` goes to ``rule``/``params``."""

    node: str
    rule: str
    params: dict[str, Any]
    saving_ms: float  # over the conv's previous option
    error: float  # likewise
    predicted_ms: float  # model latency after this step (baseline − savings so far)
    predicted_error: float  # errors so far, added


@dataclass
class Point:
    """A prefix of the sequence, built (sequential fit), judged on held-out inputs and timed."""

    steps: int
    convs: int
    predicted_ms: float  # original_ms − the steps' measured one-layer savings
    original_ms: float  # the original's median, timed interleaved with this prefix
    measured_ms: float | None
    speedup: float | None  # median over interleaved pairs of original / rewritten
    metric: float
    error: float
    passed: bool
    faster_share: float | None = None  # share of the interleaved pairs in which it beat the original


@dataclass
class Choice:
    """What the optimizer did to one conv in the returned model."""

    node: str
    rule: str
    params: dict[str, Any]
    kind_after: str
    saving_ms: float
    error_alone: float | None
    notes: str = ""
    faster_share: float | None = None  # share of the interleaved pairs in which the layer beat the original


@dataclass
class OptimizeReport:
    model: str
    metric: str
    budget: float
    rules: list[str]
    provider: str
    threads: int | None
    calibration: str
    heldout: str
    judged: list[str]  # the tensors the metric is taken over (worst of them)
    baseline_ms: float
    predicted_ms: float
    measured_ms: float
    speedup: float
    metric_value: float
    passed: bool  # a rewritten model, within the budget and faster than the original, is returned
    chosen: list[Choice] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    sequence: list[Step] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)  # held-out metrics per output (final model)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quantile: float | None = None  # the budget holds on this share of the held-out samples (None: on every one)
    excluded: dict[str, list[dict]] = field(default_factory=dict)  # per judged tensor: samples left out, and why
    timed_out: bool = False  # the time budget ended the run before the search did

    @property
    def held_on(self) -> str:
        return "worst sample" if self.quantile is None else f"{self.quantile:g} of the samples"

    @property
    def best_metric(self) -> float | None:
        """The best held-out metric of any rewritten prefix built (None when none was built)."""
        return max((p.metric for p in self.points), default=None)

    @property
    def best_speedup(self) -> float | None:
        """The best measured speed-up of any prefix built, within the budget or not."""
        return max((p.speedup for p in self.points if p.speedup is not None), default=None)

    def reached(self) -> str:
        """What the search got to, for a run that did not meet its budget."""
        if not self.points:
            return ("no rewrite was built: " + ("the time budget ran out first" if self.timed_out else
                                                 "no candidate saves measured time (in enough interleaved pairs)"))
        fast = max(self.points, key=lambda p: p.speedup or 0.0)
        return (f"best held-out {self.metric} of a rewritten model {self.best_metric:.6g} (budget {self.budget:g}); "
                f"best speed-up {self.best_speedup:.2f}× (at {self.metric} {fast.metric:.6g})")

    def summary(self) -> str:
        if not self.passed:
            return f"no faster model within the budget: {self.reached()}; the model is returned unchanged"
        return (f"{len(self.chosen)} conv(s) rewritten: {self.baseline_ms:.2f} ms → {self.measured_ms:.2f} ms "
                f"measured ({self.speedup:.2f}×; predicted {self.predicted_ms:.2f} ms), held-out {self.metric} "
                f"{self.metric_value:.6g} on the {self.held_on} (budget {self.budget:g}): PASS")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d.update(summary=self.summary(), best_metric=self.best_metric, best_speedup=self.best_speedup)
        return d


# ---- metrics ----------------------------------------------------------------------------------------------
class Judge:
    """The original model's outputs (or other ``tensors``) on a fixed input set, and the metric of a
    candidate against them, **per sample**: per tensor the worst informative sample (or, with ``quantile``
    q, the value that a share q of them reach), and the worst tensor counts. A sample whose reference is
    degenerate for the metric (:func:`convgraph.metrics.degenerate`: every value tiny, constant or
    saturated; PP-OCR det's text map on a picture without text) is left out of that tensor's figures and
    named in :attr:`excluded`; with ``strict`` a tensor with no informative sample is an error, else it
    is judged on all samples pooled. ``names``: what to call the samples (default: their index)."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[dict], metric: str, provider: str,
                 threads: int | None, tensors: Sequence[str] | None = None, *, quantile: float | None = None,
                 names: Sequence[str] | None = None, strict: bool = True):
        from .metrics import degenerate

        if metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
        if quantile is not None and not 0.0 < quantile <= 1.0:
            raise UsageError(f"--quantile is the share of held-out samples the budget must hold on, in (0, 1]; "
                             f"got {quantile}")
        self.feeds, self.metric, self.provider, self.threads = list(feeds), metric, provider, threads
        self.quantile = quantile
        if not self.feeds:
            raise UsageError("the held-out set is empty")
        self.sample_names = list(names) if names is not None else [f"#{i}" for i in range(len(self.feeds))]
        self.names = list(tensors) if tensors else [o.name for o in model.graph.output]
        produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
        missing = [t for t in self.names if t not in produced]
        if missing:
            raise UsageError(f"no tensor {missing[0]!r} in the model to judge by")
        self.ref = self._outputs(model)
        #: per tensor: (sample name, why its reference cannot show a difference), for the samples left out
        self.excluded: dict[str, list[tuple[str, str]]] = {}
        for n, refs in self.ref.items():
            out = [(self.sample_names[i], why) for i, r in enumerate(refs) if (why := degenerate(r)) is not None]
            if out and metric != "top1":
                self.excluded[n] = out
            if strict and metric != "top1" and len(out) == len(refs):
                raise UsageError(f"the reference {n!r} says nothing on any held-out sample ({out[0][1]}, e.g. on "
                                 f"sample {out[0][0]}): give held-out inputs on which it does (--heldout, --calib)")

    def _outputs(self, model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
        from .runtime import create_session, expose_tensors, run

        sess = create_session(expose_tensors(model, self.names), provider=self.provider, threads=self.threads)
        outs = {n: [] for n in self.names}
        for f in self.feeds:
            for n, v in zip(self.names, run(sess, f, self.names)):
                outs[n].append(v)
        return outs

    def _value(self, m, snr: bool = False) -> float:
        """A tensor's :class:`~convgraph.metrics.Metrics` → the figure the budget is held on: the worst
        informative sample, or the lower (1 − quantile) quantile; pooled when no sample is informative."""
        vals = np.array([v for v in (m.sample_snr_db if snr else m.sample_cosine) if v is not None], np.float64)
        if vals.size == 0:
            return float(m.snr_db if snr else m.cosine)
        if self.quantile is None:
            return float(vals.min())
        return float(np.quantile(vals, 1.0 - self.quantile, method="lower"))

    def judge(self, model: onnx.ModelProto) -> tuple[float, float, dict[str, dict]]:
        """(metric, error, per-tensor metrics with the per-sample distribution) of ``model`` against the
        original on these inputs."""
        from .metrics import compare

        got = self._outputs(model)
        per = {n: compare(self.ref[n], got[n], name=n) for n in self.names}
        field_ = "sample_snr_db" if self.metric == "snr" else "sample_cosine"
        cos = min(self._value(m) for m in per.values())
        err_cos = 1.0 - cos
        if self.metric == "cosine":
            value, error = cos, err_cos
        elif self.metric == "snr":
            value = min(self._value(m, snr=True) for m in per.values())
            error = 10 ** (-value / 10) if math.isfinite(value) else 0.0
        else:
            tops = [m.top1 for m in per.values() if m.top1 is not None]
            if not tops:
                raise UsageError("--metric top1 needs an output that looks like class scores ([N, classes])")
            value, error = min(tops), err_cos  # top-1 agreement is too coarse to rank by: cosine ranks
        out = {}
        for n, m in per.items():
            d = m.to_dict()
            vals = [v for v in getattr(m, field_) if v is not None]
            d["distribution"] = {
                "metric": "snr_db" if self.metric == "snr" else "cosine", "judged": len(vals),
                "min": min(vals, default=None),
                "p5": float(np.quantile(vals, 0.05, method="lower")) if vals else None,
                "median": float(np.median(vals)) if vals else None,
                "worst_sample": self.sample_names[m.worst_sample] if m.worst_sample is not None else None,
                "excluded": [{"sample": s, "why": w} for s, w in self.excluded.get(n, [])]}
            out[n] = d
        return value, error, out

    def allowance(self, budget: float) -> float | None:
        """The error the budget allows, for predictions (None for top1: no error scale to predict with)."""
        if self.metric == "cosine":
            return 1.0 - budget
        if self.metric == "snr":
            return 10 ** (-budget / 10)
        return None

    def passes(self, value: float, budget: float) -> bool:
        return bool(value >= budget)


# ---- candidates and per-layer latency -----------------------------------------------------------------------
def _rule_options(rule_name: str, rec: ConvRecord, ranks: Sequence[int],
                  shares: Sequence[str] | None = None) -> list[dict[str, Any]]:
    rule = get_rule(rule_name)
    if rule_name in LAYER_RANK_SHARES:
        return [{"rank": r} for r in (shares or LAYER_RANK_SHARES[rule_name])]
    if any(p.name == "rank" for p in rule.params):
        return [{"rank": r} for r in ranks]
    return [{}]


def _layer_model(cg: ConvGraph, rec: ConvRecord, nodes: Sequence[onnx.NodeProto],
                 inits: Sequence[onnx.TensorProto]) -> onnx.ModelProto:
    """A model of just ``nodes`` (the conv or its replacement): input the conv's input, output its output;
    every other tensor they read becomes an initializer with its constant value."""
    produced = {o for n in nodes for o in n.output}
    have = {t.name for t in inits}
    extra = []
    for n in nodes:
        for t in n.input:
            if t and t != rec.input and t not in produced and t not in have:
                v = RuleContext(cg).value(t)
                if v is None:
                    raise UsageError(f"conv {rec.node_id}: input {t!r} is not a constant; cannot time the layer alone")
                extra.append(onnx.numpy_helper.from_array(v, t))
                have.add(t)
    elem = cg.shapes[rec.input].elem_type if rec.input in cg.shapes else onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        list(nodes), "layer", [onnx.helper.make_tensor_value_info(rec.input, elem, list(rec.input_shape))],
        [onnx.helper.make_tensor_value_info(rec.output, elem, list(rec.output_shape))], list(inits) + extra)
    model = onnx.helper.make_model(graph, opset_imports=list(cg.model.opset_import))
    model.ir_version = cg.model.ir_version
    return model


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

        from .runtime import ort

        h = hashlib.sha256()
        for m in layers:
            shell = onnx.ModelProto()
            shell.CopyFrom(m)
            g = shell.graph
            names: dict[str, str] = {}  # tensors renamed by first appearance: builds name them afresh each time

            def canon(t: str) -> str:
                return names.setdefault(t, f"t{len(names)}") if t else t

            for vi in list(g.input) + list(g.output):
                vi.name = canon(vi.name)
            for t in g.initializer:  # shapes and dtypes stay; values go
                t.name = canon(t.name)
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(f)
            for n in g.node:
                n.name, n.doc_string = "", ""
                n.input[:] = [canon(t) for t in n.input]
                n.output[:] = [canon(t) for t in n.output]
            h.update(shell.SerializeToString(deterministic=True))
            h.update(b"\0")
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
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
               progress=None, cache: TimingCache | None = None) -> list[Candidate]:
    """Every matching (conv, rule, params) that cuts MACs, with its measured one-layer latency (from
    ``cache`` when the same layers were timed before in the same setting)."""
    from .bench import bench

    by_id = {r.node_id: r for r in records}
    out: list[Candidate] = []
    t_start = time.perf_counter()
    for done, rec in enumerate(records):
        if not (_static(rec.input_shape) and _static(rec.output_shape)):
            raise UsageError(f"conv {rec.node_id} has dynamic shapes {rec.input_shape} → {rec.output_shape}; "
                             "fix the input shape (--input-shape) to time its layers")
        options = []
        for name in rules:
            rule = get_rule(name)
            for given in _rule_options(name, rec, ranks, shares):
                params = rule.resolve_params({k: str(v) for k, v in given.items()})
                ctx = RuleContext(cg, by_id, None, params)
                if rule.match(rec, ctx) is not None:
                    break  # the rule does not apply to this conv (whatever the rank)
                macs, _, kind = rule.estimate(rec, params) if rule.estimate else (None, 0, "")
                if macs is not None and rec.macs and macs > MAX_MAC_RATIO * rec.macs:
                    continue
                rep = rule.build(rec, ctx, params)
                if any(o.get("rule") == name and o["macs"] == rep.macs_after for o in options):
                    continue  # the rank was capped: same layer as one already listed
                options.append({"rule": name, "params": given, "kind": rep.kind_after, "macs": rep.macs_after,
                                "model": _layer_model(cg, rec, rep.nodes, rep.initializers)})
        if not options:
            continue
        layers = [_layer_model(cg, rec, [cg.node(rec.node_id)], [])] + [o["model"] for o in options]
        key = TimingCache.key(layers, provider, threads, runs) if cache is not None else ""
        timed = cache.get(key) if cache is not None else None
        if timed is None:
            rep = bench(layers, runs=runs, warmup=warmup, provider=provider, threads=threads,
                        names=["original"] + [f"{o['rule']}{o['params']}" for o in options], progress=False,
                        spinning=False)
            base = np.asarray(rep.models[0].times_ms)
            timed = {"before_ms": rep.models[0].median_ms,
                     "ratios": [r.median for r in rep.ratios],  # medians over interleaved pairs
                     "won": [float(np.mean(base > np.asarray(m.times_ms))) for m in rep.models[1:]]}
            if cache is not None:
                cache.put(key, timed)
        t0 = timed["before_ms"]
        for o, ratio, won in zip(options, timed["ratios"], timed["won"]):
            out.append(Candidate(rec.node_id, o["rule"], o["params"], o["kind"], rec.macs, o["macs"], t0,
                                 t0 / ratio, faster_share=won))
        if progress is not None:
            progress(f"timing layers: {done + 1}/{len(records)} convs{_eta(t_start, done + 1, len(records))}")
    return out


def _eta(t_start: float, done: int, total: int) -> str:
    """``, about N s left`` at the rate so far (empty when nothing is left or known)."""
    if done <= 0 or done >= total:
        return ""
    left = (time.perf_counter() - t_start) / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


def _unique_names(cg: ConvGraph) -> dict[str, str]:
    """Name every main-graph op after its node id where the two differ (unnamed ops, repeated names), so
    that ids survive rewriting and reloading (an unnamed op's id is its position, a repeated name's its
    rank among the repeats: both move when other nodes are rewritten). Edits ``cg``; returns id → the
    original name, for :func:`_restore_names`."""
    renamed = {}
    for nid in cg.ops():
        proto = cg.node(nid)
        if proto.name != nid:
            renamed[nid] = proto.name
            proto.name = nid
    if renamed:
        cg.dirty = True
    return renamed


def _restore_names(model: onnx.ModelProto, renamed: Mapping[str, str]) -> onnx.ModelProto:
    """Make the ops :func:`_unique_names` named unnamed again; repeated names are not restored
    (onnxruntime refuses a model with two nodes of one name)."""
    for n in model.graph.node:
        if renamed.get(n.name) == "":
            n.name = ""
    return model


def _apply(model: onnx.ModelProto, plan: Mapping[str, tuple[str, dict]], *, calibration, input_shapes):
    """``model`` with each conv of ``plan`` (node id → (rule, params)) rewritten; returns (model, changes).

    The plan's ids must be the names of its convs, once each (:func:`_unique_names`); what the engine
    applied is compared with the plan, and a difference is an error naming the nodes."""
    names = {}
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
        model = res.model
        changes += res.report.changes
    return model, changes


# ---- the greedy sequence ------------------------------------------------------------------------------------
def greedy_sequence(cands: Sequence[Candidate], baseline_ms: float) -> list[Step]:
    """Steps in order of saving per unit of error; per conv its options' lower convex hull, in order."""
    by_node: dict[str, list[Candidate]] = {}
    for c in cands:
        if c.error is not None and c.saving_ms > 0 and math.isfinite(c.error) and (
                c.faster_share is None or c.faster_share >= STABLE_SHARE):
            by_node.setdefault(c.node, []).append(c)
    moves = []
    for node, opts in by_node.items():
        opts.sort(key=lambda c: (c.error, -c.saving_ms))
        hull: list[Candidate] = []
        for c in opts:  # keep the options on the lower-right hull of (error, saving)
            if hull and c.saving_ms <= hull[-1].saving_ms:
                continue
            while hull:
                prev_e, prev_s = (hull[-2].error, hull[-2].saving_ms) if len(hull) > 1 else (0.0, 0.0)
                e1, s1 = hull[-1].error - prev_e, hull[-1].saving_ms - prev_s
                e2, s2 = c.error - prev_e, c.saving_ms - prev_s
                if s1 * max(e2, ERROR_FLOOR) <= s2 * max(e1, ERROR_FLOOR):  # c is at least as efficient
                    hull.pop()
                else:
                    break
            hull.append(c)
        prev_e = prev_s = 0.0
        for i, c in enumerate(hull):
            de, ds = max(c.error - prev_e, 0.0), c.saving_ms - prev_s
            moves.append((ds / max(de, ERROR_FLOOR), node, i, c, ds, de))
            prev_e, prev_s = c.error, c.saving_ms
    # order by efficiency; a conv's later steps never before its earlier ones (the hull makes them less efficient)
    moves.sort(key=lambda m: (-m[0], m[1], m[2]))
    steps, ms, err = [], baseline_ms, 0.0
    for _, node, _, c, ds, de in moves:
        ms -= ds
        err += de
        steps.append(Step(node, c.rule, dict(c.params), ds, de, ms, err))
    return steps


def plan_of(steps: Sequence[Step]) -> dict[str, tuple[str, dict]]:
    """node → (rule, params) after these steps (a conv's last step wins)."""
    plan: dict[str, tuple[str, dict]] = {}
    for s in steps:
        plan[s.node] = (s.rule, s.params)
    return plan


def search(steps: Sequence[Step], evaluate, *, allowance: float | None, max_evals: int, stop=None) -> list[Step]:
    """Find the longest passing prefix of ``steps`` with at most ``max_evals`` calls of ``evaluate(prefix)
    -> (passed, error)``, backing off the steps that break it.

    Bisection between the longest prefix known to pass and the shortest known to fail, the first guess
    from the predicted errors (scaled by how far the measured error of the last passing prefix exceeded
    its prediction). When the two are adjacent, the step between them alone turns a passing model into a
    failing one: it is backed off — dropped, with the later (more aggressive) steps of the same conv —
    and the search goes on over the rest; ``stop()`` true ends it (a time budget). Returns the steps backed off.
    """
    seq, dropped = list(steps), []
    lo, hi, evals, scale = 0, len(seq) + 1, 0, 1.0

    def guess() -> int:
        if allowance is None:
            return lo + max(1, (len(seq) - lo) // 2)
        total, k = 0.0, lo + 1
        for i, st in enumerate(seq):
            total += st.error
            if i >= lo and total * scale <= allowance:
                k = i + 1
        return k

    k = min(guess(), len(seq))
    while seq and evals < max_evals and not (stop is not None and stop()):
        if hi - lo == 1:
            if hi > len(seq):
                break  # the whole (remaining) sequence passes
            bad = seq[hi - 1]
            dropped += [st for st in seq[hi - 1:] if st.node == bad.node]
            seq = seq[:hi - 1] + [st for st in seq[hi:] if st.node != bad.node]
            hi = len(seq) + 1
            if lo >= len(seq):
                break
            k = min(guess(), len(seq))
            continue
        passed, err = evaluate(seq[:k])
        evals += 1
        if passed:
            lo = k
            predicted = sum(st.error for st in seq[:k])
            scale = max(scale, err / predicted) if predicted > 0 else scale
            grow = min(len(seq), lo + max(1, (lo + 1) // 2))
            k = max(guess(), grow) if hi > len(seq) else (lo + hi) // 2
        else:
            hi = k
            k = (lo + hi) // 2
        k = min(max(k, lo + 1), hi - 1) if hi - lo > 1 else k
    return dropped


def needs_shorter(p: Point) -> bool:
    """Whether a built prefix calls for trying a shorter one: no faster than the original, or slower than
    its layers' measured savings predict by more than PREDICTION_SLACK (latency not additive)."""
    return p.speedup is None or p.speedup <= 1.0 or p.measured_ms > PREDICTION_SLACK * p.predicted_ms


# ---- sequential fitting ---------------------------------------------------------------------------------------
def fit_sequential(original: onnx.ModelProto, plan: Mapping[str, tuple[str, dict]], calib, *,
                   input_shapes=None, provider: str = "cpu", threads: int | None = None,
                   progress=None, cache: dict | None = None) -> tuple[onnx.ModelProto, list]:
    """Apply ``plan`` (node → (rule, params)) in stages, in topological order: each conv's statistics are
    gathered on the model rewritten so far, with the original as the reference, so its fit targets the
    original layer's output from the activations it will really get. Convs none of which lies upstream of
    another share a stage (one calibration pass). ``cache`` (a dict kept between calls with the same
    ``original`` and ``calib``) keeps the model after each run of stages: a plan whose first stages are
    those of an earlier plan (same convs, rules and params in each) starts after them. Returns the model
    and the engine's changes."""
    cg = load(original, input_shapes, check=False)
    order = {n: i for i, n in enumerate(cg.topological_order())}
    nodes = sorted(plan, key=lambda n: order[n])
    depth = _stages(cg, set(nodes))
    recs = {r.node_id: r for r in analyze(cg, rewrites=False).convs}
    stages = [[n for n in nodes if depth[n] == k] for k in range(max(depth.values(), default=-1) + 1)]
    keys = [tuple((n, plan[n][0], repr(sorted(plan[n][1].items()))) for n in members) for members in stages]
    model, changes, start = original, [], 0
    for j in range(len(stages), 0, -1) if cache is not None else ():
        hit = cache.get(tuple(keys[:j]))
        if hit is not None:
            model, changes, start = hit[0], list(hit[1]), j
            break
    for stage in range(start, len(stages)):
        members = stages[stage]
        calibrated = [n for n in members if calibratable(recs[n]) is None]
        stats = Calibration()
        if calibrated:
            stats = calibrate(model, calib, nodes=calibrated, reference=original, input_shapes=input_shapes,
                              provider=provider, threads=threads)
        model, ch = _apply(model, {n: plan[n] for n in members}, calibration=stats, input_shapes=input_shapes)
        changes += ch
        if cache is not None:
            _keep(cache, tuple(keys[:stage + 1]), (model, list(changes), model.ByteSize()))
        if progress is not None:
            progress(stage)
    return model, changes


#: Models kept by fit_sequential's cache, in bytes (the oldest go first).
FIT_CACHE_BYTES = 384 << 20


def _keep(cache: dict, key, entry) -> None:
    cache[key] = entry
    total = sum(e[2] for e in cache.values())
    while total > FIT_CACHE_BYTES and len(cache) > 1:
        oldest = next(iter(cache))
        total -= cache.pop(oldest)[2]


def _stages(cg: ConvGraph, chosen: set[str]) -> dict[str, int]:
    """Per chosen node, how many chosen nodes lie upstream of it on the longest path: one topological
    pass (linear in the graph), so that convs with no chosen conv between them share a stage."""
    G = cg.graph
    above: dict[str, int] = {}  # stages completed by the chosen nodes upstream of a node, inclusive
    depth: dict[str, int] = {}
    for v in nx.topological_sort(G):
        level = max((above[u] for u in G.predecessors(v)), default=0)
        if v in chosen:
            depth[v] = level
            level += 1
        above[v] = level
    return depth


# ---- the optimizer -------------------------------------------------------------------------------------------
def _input_set(model: onnx.ModelProto, inputs, input_shapes, options: Mapping[str, Any], what: str) -> InputSet:
    data = make_inputs(model, inputs, input_shapes=input_shapes, **options)
    if len(data) == 0:
        raise UsageError(f"the {what} set is empty")
    return data


def _subset(data: InputSet, idx: Sequence[int], describe: str) -> InputSet:
    idx = list(idx)
    return InputSet(len(idx), lambda i: data[idx[i]], describe, data.specs)


#: The share of a time budget (from the start) after which no more candidate errors are measured: the
#: rest is left for building and judging prefixes.
ERRORS_SHARE = 0.6
#: Fewer calibration (held-out) samples than this get a warning that says what it risks.
FEW_CALIBRATION, FEW_HELDOUT = 16, 8


def _sample_risks(calibration: int, heldout: int, split: bool) -> list[str]:
    """Warnings for a calibration or held-out set too small, or a held-out set split off the calibration
    set (alike to the data fitted on: the budget it passes says little about other data)."""
    out = []
    if calibration < FEW_CALIBRATION:
        out.append(f"only {calibration} calibration sample(s): the fits see few activations (a layer with many "
                   f"inputs per output can fit them and miss other data); give {FEW_CALIBRATION}+ varied ones "
                   "(other scenes and sources than the held-out set)")
    if heldout < FEW_HELDOUT:
        out.append(f"the budget is checked on {heldout} held-out sample(s) only: it may not hold on other "
                   f"inputs; give {FEW_HELDOUT}+ (--heldout), unlike the calibration set")
    if split:
        out.append("the held-out samples were split off the calibration set: they are like the data the fits "
                   "saw, and a budget held on them can fail on other data (seen: YOLOv8n class scores at "
                   "cosine 0.74 on other photos while crops of the calibration photos passed); give --heldout "
                   "from other sources")
    return out


def _alone(original: onnx.ModelProto, cg: ConvGraph, by_id: Mapping[str, ConvRecord], c: Candidate, stats,
           input_shapes) -> onnx.ModelProto | None:
    """``original`` with the one conv of candidate ``c`` replaced, fitted on ``stats``: the rule's nodes
    spliced into a copy of the model in the conv's place (no reload, analysis or checks of the whole
    model: they cost more than the fit). Through the engine (:func:`_apply`) when the replacement does not
    simply stand in for the conv; None when the rule refuses the conv with these statistics."""
    rec, rule = by_id[c.node], get_rule(c.rule)
    params = rule.resolve_params({k: str(v) for k, v in c.params.items()})
    ctx = RuleContext(cg, by_id, stats, params)
    if rule.match(rec, ctx) is not None:
        return None
    rep = rule.build(rec, ctx, params)
    made = {o for n in rep.nodes for o in n.output}
    if (rep.removed and list(rep.removed) != [rec.node_id]) or rec.output not in made:
        return _apply(original, {c.node: (c.rule, c.params)}, calibration=stats, input_shapes=input_shapes)[0]
    m = onnx.ModelProto()
    m.CopyFrom(original)
    nodes = list(m.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == c.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes[:i] + list(rep.nodes) + nodes[i + 1:])
    m.graph.initializer.extend(rep.initializers)  # the conv's own weights stay, unread: onnxruntime drops them
    return m


def _measure(original, cg, records, rules, ranks, shares, fit_set, judge: Judge, *, provider, threads, input_shapes,
             layer_runs: int, seconds: dict, say, deadline: float, cache: TimingCache | None,
             notes: list[str]) -> list[Candidate]:
    """Phases 1–3: candidates, their one-layer latencies, and each one's error alone (fitted on ``fit_set``);
    past ``deadline`` the remaining candidates get no error (they are not chosen)."""
    t = time.perf_counter()
    say("timing layers")
    cands = candidates(cg, records, rules, ranks, shares=shares, provider=provider, threads=threads, runs=layer_runs,
                       warmup=max(3, layer_runs // 10), progress=say, cache=cache)
    seconds["layer_latency"] = time.perf_counter() - t
    t = time.perf_counter()
    say("calibrating")
    by_id = {r.node_id: r for r in records}
    calibrated = sorted({c.node for c in cands if c.saving_ms > 0 and calibratable(by_id[c.node]) is None})
    stats = calibrate(original, fit_set, nodes=calibrated, input_shapes=input_shapes, provider=provider,
                      threads=None) if calibrated else Calibration()
    seconds["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    # the largest savings first: when a time budget runs out, what is left unmeasured is worth the least
    todo = sorted((c for c in cands if c.saving_ms > 0), key=lambda c: -c.saving_ms)
    for i, c in enumerate(todo):
        if time.perf_counter() > deadline:
            notes.append(f"--time-budget: {len(todo) - i} of {len(todo)} candidates (the smallest savings) had no "
                         f"time left for measuring their errors and were not considered")
            break
        say(f"errors of the candidates: {i + 1}/{len(todo)}{_eta(t, i, len(todo))}")
        m = _alone(original, cg, by_id, c, stats, input_shapes)
        if m is not None:
            c.metric, c.error, _ = judge.judge(m)
    seconds["candidate_errors"] = time.perf_counter() - t
    return cands


def optimize(model, calib, heldout=None, *, budget: float = 0.99, metric: str = "cosine",
             rules: Sequence[str] = DEFAULT_RULES, ranks: Sequence[int] = DEFAULT_RANKS,
             shares: Sequence[str] | None = None, selection: Selection | None = None, provider: str = "cpu", threads: int | None = 1,
             input_shapes: Mapping[str, Sequence[int]] | None = None, input_options: Mapping[str, Any] | None = None,
             tensors: Sequence[str] | None = None, measured: Sequence[Candidate] | None = None, probe: int = 8,
             layer_runs: int = 30, bench_runs: int = 20, max_evals: int = 6, quantile: float | None = None,
             time_budget: float | None = None, timing_cache: "TimingCache | str | os.PathLike | None" = None,
             progress=None) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Rewrite the convs of ``model`` for the most measured speed within ``budget`` on held-out inputs.

    ``calib``/``heldout``: what :func:`convgraph.inputs.make_inputs` takes (an image folder, an ``.npz``, a
    list of feeds, an InputSet), with ``input_options`` (image_size, mean, std, layout, samples); without
    ``heldout`` every fourth calibration sample is held out. ``budget``: the least allowed value of
    ``metric`` (cosine, SNR in dB, or top-1 agreement) on the held-out set, over the model outputs or the
    given ``tensors`` (the worst counts; e.g. a detector's class scores, which a decoded box output hides).
    ``threads``: onnxruntime intra-op threads of every latency measured (None: its default); the runs
    that only compute (calibration, judging errors) use onnxruntime's default, every core. ``probe``:
    calibration samples kept out of the candidates' fits to measure their errors on (the final fits use
    all). ``measured``: the candidates of an earlier run (``report.candidates``) on the same model, data,
    rules and metric, to try another budget without measuring them again. ``shares``: the ranks tried for
    the rules whose rank spans the whole layer (``low-rank``), as shares of the full rank (default
    :data:`LAYER_RANK_SHARES`); ``ranks`` are the others'. ``time_budget``: seconds the whole run may
    take; when they run out the search stops and the best verified result so far is returned, with a note.
    ``timing_cache``: a :class:`TimingCache` (or its file) keeping one-layer timings across runs. The
    budget holds per held-out sample: on the worst one, or with ``quantile`` q on a share q of them
    (:class:`Judge`; samples whose reference is degenerate are left out and named in the report).
    ``max_evals``: prefixes built and judged in the final search. ``progress``: a callable taking one-line
    status messages (stage, count, time left). Returns the optimized model (the original when no faster
    model fits the budget; ``report.passed`` then False) and the report.
    """
    t_start = time.perf_counter()
    deadline = t_start + time_budget if time_budget is not None else math.inf
    if time_budget is not None and not time_budget > 0:
        raise UsageError(f"--time-budget must be a positive number of seconds, got {time_budget}")
    seconds: dict[str, float] = {}
    run_notes: list[str] = []  # what the run itself has to say (cache, time budget)
    fits: dict = {}  # fitted stages shared between prefixes (fit_sequential's cache)
    say = progress or (lambda *_: None)
    options = dict(input_options or {})
    selection = selection or Selection()
    selection.check()
    if metric in ("cosine", "top1") and not 0.0 < budget <= 1.0:
        raise UsageError(f"--budget for {metric} is the least allowed value, in (0, 1]; got {budget}")
    for r in rules:
        get_rule(r)
    for r in set(rules) & set(LAYER_RANK_SHARES):
        for share in shares or ():
            get_rule(r).resolve_params({"rank": str(share)})  # UsageError now, not after the calibration
    cg = load(model, input_shapes, probe=True, input_values=options.get("values"))  # timing a layer needs shapes
    records = [r for r in analyze(cg, rewrites=False).convs
               if not r.graph and selection.why_not(r) is None]
    renamed = _unique_names(cg)  # plans go by node id: ids must survive rewriting (names restored at the end)
    original = cg.to_model()
    label = "<model>" if isinstance(model, (bytes, onnx.ModelProto, ConvGraph)) else str(model)

    calib_set = _input_set(original, calib, input_shapes, options, "calibration")
    if heldout is None:
        if len(calib_set) < 4:
            raise UsageError("give a held-out set (--heldout), or at least 4 calibration samples to split one off")
        held_set = _subset(calib_set, range(3, len(calib_set), 4), f"every 4th of {calib_set.describe}")
        calib_set = _subset(calib_set, [i for i in range(len(calib_set)) if i % 4 != 3], calib_set.describe)
    else:
        held_set = _input_set(original, heldout, input_shapes, options, "held-out")
    # ``threads`` is for what is timed; runs that only compute (judging, calibration) use every core
    if heldout is None:
        held_names = [f"calibration sample {i}" for i in range(3, len(calib_set) + len(held_set), 4)]
    else:
        held_names = getattr(held_set, "names", None)
    judge_held = Judge(original, list(held_set), metric, provider, None, tensors, quantile=quantile,
                       names=held_names)
    risks = _sample_risks(len(calib_set), len(held_set), heldout is None)
    # candidates are fitted on most of the calibration set and their error measured on the rest (``probe``
    # samples spread over the set, so that they are like it): errors measured on the fitting data itself
    # flatter the fits that overfit
    n_probe = min(probe, len(calib_set) // 2)
    if n_probe < 1:
        raise UsageError("at least 2 calibration samples are needed (one to fit on, one to measure errors on)")
    probe_idx = sorted({int(i) for i in np.linspace(len(calib_set) - 1, 0, n_probe).round()})
    fit_set = _subset(calib_set, [i for i in range(len(calib_set)) if i not in probe_idx], calib_set.describe)
    judge_probe = Judge(original, [calib_set[i] for i in probe_idx], metric, provider, None, tensors,
                        quantile=quantile, strict=False)

    from .bench import bench

    base = bench(original, runs=bench_runs, warmup=3, provider=provider, threads=threads,
                 input_shapes=input_shapes, progress=False)
    baseline_ms = base.models[0].median_ms
    if measured is not None:  # an earlier run's candidates: same model, data, rules and metric
        cands = [Candidate(**asdict(c)) for c in measured]
    else:
        cache = timing_cache if isinstance(timing_cache, TimingCache) or timing_cache is None else \
            TimingCache(timing_cache)
        # the candidates' errors may take a share of a time budget; the rest is the search's
        errors_until = t_start + ERRORS_SHARE * time_budget if time_budget is not None else math.inf
        cands = _measure(original, cg, records, rules, ranks, shares, fit_set, judge_probe, provider=provider,
                         threads=threads, input_shapes=input_shapes, layer_runs=layer_runs, seconds=seconds, say=say,
                         deadline=errors_until, cache=cache, notes=run_notes)
        if cache is not None:
            cache.save()
            run_notes.append(f"one-layer timings: {cache.hits} conv(s) from the cache ({cache.path}), "
                             f"{cache.misses} timed")

    steps = greedy_sequence(cands, baseline_ms)
    allowance = judge_held.allowance(budget)

    t = time.perf_counter()
    points: list[Point] = []
    built: list[tuple[Point, list[Step], onnx.ModelProto, list, dict]] = []

    def evaluate(prefix: list[Step]) -> tuple[bool, float]:
        say(f"search: building and judging {len(prefix)} steps ({len(plan_of(prefix))} convs), prefix "
            f"{len(points) + 1} of at most {max_evals}{_eta(t, len(points), max_evals)}")
        m, changes = fit_sequential(original, plan_of(prefix), calib_set, input_shapes=input_shapes,
                                    provider=provider, cache=fits)
        value, err, per = judge_held.judge(m)
        b = bench([original, m], runs=bench_runs, warmup=3, provider=provider, threads=threads,
                  input_shapes=input_shapes, names=["original", "optimized"], progress=False)
        orig_ms = b.models[0].median_ms
        won = float(np.mean(np.asarray(b.models[0].times_ms) > np.asarray(b.models[1].times_ms)))
        p = Point(len(prefix), len(plan_of(prefix)), orig_ms - sum(s.saving_ms for s in prefix), orig_ms,
                  b.models[1].median_ms, b.ratios[0].median, value, err, judge_held.passes(value, budget), won)
        points.append(p)
        built.append((p, list(prefix), m, changes, per))
        return p.passed, err

    def out_of_time() -> bool:
        return time.perf_counter() > deadline

    backed_off = search(steps, evaluate, allowance=allowance, max_evals=max_evals, stop=out_of_time) if steps else []
    seconds["search"] = time.perf_counter() - t

    passing = [b for b in built if b[0].passed]
    # Latency need not fall along the sequence (launch-bound on a GPU, more nodes can cost more than the
    # MACs save): while the fastest passing prefix is no faster than the original, or its measured latency
    # is far from the sum of its layers' savings, halve the shortest one.
    tries, shorter = max(2, max_evals - len(points)), []
    while passing and tries and not out_of_time() and needs_shorter(max(passing, key=lambda b: b[0].speedup)[0]):
        shortest = min((b[1] for b in passing), key=len)
        if len(shortest) < 2:
            break
        evaluate(shortest[:len(shortest) // 2])
        shorter.append(len(shortest) // 2)
        tries -= 1
        passing = [b for b in built if b[0].passed]
    faster = [b for b in passing if b[0].speedup > 1.0]
    notes = list(cg.warnings) + risks + run_notes  # loading (dynamic inputs, shapes probed), few samples, the run
    timed_out = out_of_time() or any(n.startswith("--time-budget") for n in run_notes)
    if out_of_time() and steps:
        notes.append(f"--time-budget of {time_budget:g} s ran out: the search stopped after {len(points)} prefix(es) "
                     "built; the result is the best verified so far")
    repeated = sorted(n for n, old in renamed.items() if old)
    if repeated:
        notes.append(f"{len(repeated)} op(s) shared a name with another (onnxruntime refuses such a model): the "
                     f"result names them after their ids: {', '.join(repeated[:5])}"
                     f"{' …' if len(repeated) > 5 else ''}")
    for name, out in judge_held.excluded.items():
        notes.append(f"{len(out)} of {len(held_set)} held-out sample(s) left out of judging {name!r}, their "
                     f"reference saying nothing to compare with: " + "; ".join(f"{s_} ({why})" for s_, why in out))
    if shorter:
        notes.append(f"latency did not follow the layers' measured savings (not faster than the original, or "
                     f"over {PREDICTION_SLACK - 1:.0%} slower than predicted): also built the prefixes of "
                     f"{', '.join(map(str, shorter))} steps")
    if passing and not faster:
        notes.append(f"no prefix within the budget ran faster than the original (best measured speed-up "
                     f"{max(b[0].speedup for b in passing):.3f}×, although the one-layer timings predicted "
                     f"savings): the model is returned unchanged")
    if faster:
        top = max(b[0].speedup for b in faster)  # within timing noise of the fastest, the fewest steps
        best, prefix, final, changes, per = min((b for b in faster if b[0].speedup >= top - SPEED_NOISE * top),
                                                key=lambda b: (b[0].steps, -b[0].speedup))
        plan = plan_of(prefix)
        value, measured, speedup, predicted = best.metric, best.measured_ms, best.speedup, best.predicted_ms
        baseline_ms = best.original_ms  # the chosen model's ms and speed-up come from one interleaved run
    else:
        final, changes, plan = original, [], {}
        value, _, per = judge_held.judge(original)
        measured, speedup, predicted = baseline_ms, 1.0, baseline_ms
        if not passing:
            notes.append("no rewrite kept the held-out metric within the budget: the model is returned unchanged"
                         if points else "no prefix was built: the model is returned unchanged" if steps else
                         "no candidate rewrite saves measured time")
    if backed_off:
        notes.append("backed off (each turned a passing prefix into a failing one): " + ", ".join(
            f"{b.node} {b.rule} {','.join(f'{k}={v}' for k, v in b.params.items())}" for b in backed_off))
    by_cand = {(c.node, c.rule, repr(sorted(c.params.items()))): c for c in cands}
    by_change = {}
    for ch in changes:
        by_change[ch.node] = ch
    chosen = []
    for node, (rule, params) in plan.items():
        c = by_cand[(node, rule, repr(sorted(params.items())))]
        ch = by_change.get(node)
        chosen.append(Choice(node, rule, dict(params), c.kind_after, c.saving_ms, c.error,
                             ch.notes if ch else "", c.faster_share))
    seconds["total"] = time.perf_counter() - t_start
    report = OptimizeReport(
        model=label, metric=metric, budget=budget, rules=list(rules), provider=provider, threads=threads,
        calibration=calib_set.describe, heldout=held_set.describe, judged=list(judge_held.names),
        baseline_ms=baseline_ms, predicted_ms=predicted,
        measured_ms=measured, speedup=speedup, metric_value=value, passed=bool(chosen),
        chosen=chosen, candidates=list(cands), sequence=steps, points=sorted(points, key=lambda p: p.steps),
        outputs=per, seconds=seconds, notes=notes, quantile=quantile, timed_out=timed_out,
        excluded={n: [{"sample": s_, "why": w} for s_, w in out] for n, out in judge_held.excluded.items()})
    return _restore_names(final, renamed), report


# ---- the plot --------------------------------------------------------------------------------------------------
def check_plot_path(path, model=None, output=None) -> Path:
    """Refuse (UsageError) a plot path before any work: matplotlib missing, a format it cannot write, the
    input model or the output model, a folder or a missing folder (:func:`convgraph.io.check_output_path`)."""
    p = Path(os.fspath(path))
    for other, what in ((model, "the input model"), (output, "the output model")):
        if other is not None and p.resolve() == Path(os.fspath(other)).resolve():
            raise UsageError(f"--plot {p} is {what}; give the plot a file of its own")
    check_output_path(p, model)  # also a hard link to the input, a folder, a missing folder
    fmt = p.suffix[1:].lower()
    pyplot()
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if fmt not in formats:
        raise UsageError(f"--plot {p}: matplotlib cannot write {'.' + fmt if fmt else 'files without an extension'}; "
                         f"name a .png (or {', '.join('.' + f for f in sorted(formats) if f != 'png')})")
    return p


def plot_pareto(report: OptimizeReport, path) -> None:
    """A picture of the error–latency front (format from the file's extension, written atomically): the
    greedy sequence as predicted, and the prefixes as measured."""
    path = check_plot_path(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = 1e-6
    if report.sequence:
        xs = [0.0] + [s.predicted_error for s in report.sequence]
        first = report.sequence[0]
        ys = [first.predicted_ms + first.saving_ms] + [s.predicted_ms for s in report.sequence]
        ax.plot([max(x, floor) for x in xs], ys, "-", color="0.6", label="greedy sequence (predicted)")
    pts = report.points
    if pts:
        ax.scatter([max(p.error, floor) for p in pts], [p.measured_ms for p in pts],
                   c=["tab:green" if p.passed else "tab:red" for p in pts], zorder=3,
                   label="built and measured (green: within budget)")
        for p in pts:
            ax.annotate(str(p.steps), (max(p.error, floor), p.measured_ms), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.scatter([floor], [report.baseline_ms], marker="s", color="k", zorder=3, label="original")
    allowed = {"cosine": 1 - report.budget, "snr": 10 ** (-report.budget / 10)}.get(report.metric)
    if allowed:
        ax.axvline(max(allowed, floor), color="tab:blue", ls="--", lw=1,
                   label=f"budget ({report.metric} {report.budget:g})")
    ax.set_xscale("log")
    ax.set_xlabel("model output error (1 − cosine)" if report.metric != "snr" else "noise / signal power")
    ax.set_ylabel(f"latency, ms ({report.provider}, {report.threads or 'default'} thread(s))")
    ax.set_title(f"{report.model.rsplit('/', 1)[-1]}: error vs latency")
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower())
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
