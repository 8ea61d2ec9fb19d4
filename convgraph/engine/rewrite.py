"""The rule engine: find convs, rewrite them with rules, report what changed.

``rewrite()`` works on a copy of the model: for each rule (pre-pass rules such as fold-bn first) it
analyzes the current graph, matches the selected convs, builds replacements, splices them in and
removes what they orphaned; :mod:`convgraph.engine.rewrite_check` then checks the result (structure, each
rewrite alone, the model outputs). An exact rule that leaves tolerance is refused (a bug, named by
node); an approximate one reports its error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import onnx

from . import regions
from ..analysis.analyze import analyze
from ..errors import UsageError
from ..model.graph import ConvGraph
from ..model.loader import load
from ..progress import staged
from ..model.record import REWRITES_KEY, ConvRecord
from ..registry import get_rule
from .rewrite_check import numerics, structural_checks
from .rewrite_report import Change, Explanation, RewriteReport
from ..rule import Rule, RuleContext, Skip

#: Ops whose outputs depend only on their inputs: safe to drop once nothing reads them.
_PURE_CONST_OPS = {"Constant", "ConstantOfShape", "DequantizeLinear", "Identity", "Cast", "Reshape",
                   "Transpose", "Unsqueeze", "Squeeze", "Mul", "Add", "Div", "Sub"}


@dataclass
class Selection:
    """Which convs a rewrite may touch."""

    nodes: str | None = None  # regex on the node name (or id), re.search
    exclude: str | None = None
    kinds: Sequence[str] = ()
    min_macs: int | None = None
    node_ids: Collection[str] | None = None  # exact node ids (names can repeat; ids cannot), as plans give them

    def why_not(self, rec: ConvRecord) -> str | None:
        """None when ``rec`` is selected, else the reason it is not."""
        if self.node_ids is not None and rec.node_id not in self.node_ids:
            return "node id not in the selected ids"
        label = rec.name or rec.node_id
        if self.nodes and not re.search(self.nodes, label):
            return f"name does not match --nodes {self.nodes!r}"
        if self.exclude and re.search(self.exclude, label):
            return f"name matches --exclude {self.exclude!r}"
        if self.kinds and rec.kind not in self.kinds:
            return f"kind {rec.kind} not in --kind {','.join(self.kinds)}"
        if self.min_macs is not None and (rec.macs is None or rec.macs < self.min_macs):
            return f"MACs {rec.macs} below --min-macs {self.min_macs}"
        return None

    def check(self) -> None:
        for flag, rx in (("--nodes", self.nodes), ("--exclude", self.exclude)):
            if rx:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise UsageError(f"bad {flag} regex {rx!r}: {e}") from None


@dataclass
class RewriteResult:
    model: onnx.ModelProto | None  # None in a dry run
    report: RewriteReport


def _drop_orphans(graph: ConvGraph, tensors: set[str]) -> None:
    """Remove initializers and pure constant-making nodes that only the replaced nodes read."""
    G = graph.graph
    todo = list(tensors)
    while todo:
        t = todo.pop()
        src = graph.producer(t)
        if src is None or src not in G or G.out_degree(src) > 0:
            continue
        d = G.nodes[src]
        if d["kind"] == "initializer":
            G.remove_node(src)
            graph.dirty = True
        elif d["kind"] == "op" and d["op_type"] in _PURE_CONST_OPS and not d["subgraphs"]:
            inputs = {i for i in d["proto"].input if i}
            graph.replace([src], [])
            todo.extend(inputs)


def _dearer(rule: Rule, params: dict, rec: ConvRecord, macs: int | None, before: int | None = None) -> str | None:
    before = rec.macs if before is None else before  # a rule replacing several convs says what they cost
    if rule.makes_dearer(params, before, macs):
        return (f"would add MACs ({before:,} → {macs:,}), which an approximate rule is not for; "
                f"name the node with --nodes to rewrite it anyway")
    return None


def _or(value, default):
    return default if value is None else value


@staged(lambda cg, rule, *_: f"applying {rule.name}")
def _apply(cg: ConvGraph, rule: Rule, params: dict, selection: Selection, report: RewriteReport,
           dry_run: bool, calibration: dict | None, checks: "dict[int, regions.Region | str] | None") -> None:
    """One pass of ``rule`` over every selected conv of every (sub)graph; ``checks`` (when the result will be
    verified) gets, per change (its index in the report), the region to check it alone on, or why there is none."""
    analysis = analyze(cg, rewrites=False)  # the engine matches and builds; it reads no estimates
    graphs = {g.path: g for g in cg.walk()}
    records: dict[str, dict[str, ConvRecord]] = {}  # per graph: node id -> record, built once
    for r in analysis.convs:
        records.setdefault(r.graph, {})[r.node_id] = r
    consumed: set[tuple[str, str]] = set()
    # an approximate rule that would make a conv dearer is not applied unless the user named the node
    guard_macs = not selection.nodes
    for rec in analysis.convs:
        label = rec.name or rec.node_id
        if (rec.graph, rec.node_id) in consumed:
            continue
        why = selection.why_not(rec)
        graph = graphs[rec.graph]
        ctx = RuleContext(graph, records[rec.graph], calibration, params)
        found = None
        if why is None:
            why, found = rule.check(rec, ctx)
        estimate = rule.estimate(rec, params) if why is None and rule.estimate is not None else None
        if why is None and guard_macs and estimate is not None:
            why = _dearer(rule, params, rec, estimate[0])
        rep, skipped = None, False
        if why is None and not dry_run:
            try:
                rep = rule.make(rec, ctx, params, found)
            except (Skip, np.linalg.LinAlgError) as e:  # this conv cannot be rewritten after all: say why, go on
                why, skipped = "skipped: " + (str(e) if isinstance(e, Skip) else f"the fit failed ({e})"), True
            if rep is not None and guard_macs:
                why = _dearer(rule, params, rec, rep.macs_after, rep.macs_before)
        report.explain.append(Explanation(label, rule.name, why is None, why or "applies", skipped))
        if why is not None:
            continue
        if rep is None:  # dry run
            consumed.update((rec.graph, n) for n in (found.nodes if found else ()))
            if estimate is not None:
                macs, prm, kind = estimate
                report.changes.append(Change(rule.name, label, rec.graph, rec.kind, kind, rec.macs, macs, rec.params,
                                             prm, rule.is_exact(params), rec.output))
            continue
        removed = rep.removed or [rec.node_id]
        old_names = [graph.node(n).name or n for n in removed]
        read = {t for n in removed for t in graph.node(n).input if t}
        for n in removed:
            consumed.add((rec.graph, n))
        old = regions.capture(graph, [graph.node(n) for n in removed]) if checks is not None else None
        new_ids = graph.replace(removed, rep.nodes, rep.initializers)
        _drop_orphans(graph, read)
        outputs = [o for n in rep.nodes for o in n.output]
        out = rec.output if rec.output in outputs else rep.nodes[-1].output[0]
        if checks is not None:
            region = regions.build(graph, old, [graph.node(n) for n in new_ids], cg.model) if old else None
            checks[len(report.changes)] = region or "the replaced nodes cannot run alone"
        report.changes.append(Change(
            rule.name, label, rec.graph, rec.kind, rep.kind_after, _or(rep.macs_before, rec.macs), rep.macs_after,
            _or(rep.params_before, rec.params), rep.params_after, rep.exact, out,
            [graph.node(n).name or n for n in new_ids], old_names,
            rep.weight_error, notes=rep.notes))


def _metadata(model: onnx.ModelProto, changes: list[Change]) -> None:
    record = {"rewrites": [{"rule": c.rule, "old_nodes": c.old_nodes, "new_nodes": c.new_nodes, "exact": c.exact,
                            "graph": c.graph, "output": c.output} for c in changes],
              "tensor_map": {}}
    for p in model.metadata_props:
        if p.key == REWRITES_KEY:  # rewriting a rewritten model: keep the history
            old = json.loads(p.value)
            record["rewrites"] = old.get("rewrites", []) + record["rewrites"]
            model.metadata_props.remove(p)
            break
    model.metadata_props.add(key=REWRITES_KEY, value=json.dumps(record))


def rewrite(source, rules: Sequence[str], *, params: dict[str, str] | None = None, selection: Selection | None = None,
            input_shapes: dict[str, list[int]] | None = None, inputs=None, input_options: dict | None = None,
            verify: bool = True,
            atol: float | None = None, rtol: float | None = None, min_cosine: float | None = None,
            bench: bool = False, bench_runs: int = 20, threads: int | None = None, provider: str = "cpu",
            dry_run: bool = False, calib=None, calibration: dict | None = None, probe: bool = False) -> RewriteResult:
    """Rewrite the convs of ``source`` (path, bytes, ModelProto or ConvGraph) with ``rules`` (names, in order).

    ``params`` (``{"rank": "full"}``) go to every rule that declares them. ``inputs`` and ``input_options``
    (samples, seed, image_size, mean, std, layout) are what :func:`convgraph.run.inputs.make_inputs` takes.
    ``calib`` (the same kinds of inputs) runs the model once to collect each conv's input-patch
    statistics, so that approximate rules fit on real activations (``fit=data``); ``calibration``
    passes statistics already collected (:func:`convgraph.engine.calibrate.calibrate`). With ``verify`` the result is
    checked with onnxruntime against the original: exact rewrites must keep each node's output within
    1e-4 relative (else CheckFailed names the node); ``atol``/``rtol``/``min_cosine`` make the model
    outputs' tolerance a requirement (report.passed False when exceeded). ``probe`` measures the shapes
    onnx's inference loses (:func:`convgraph.model.probe.probe_shapes`), so that those convs get MACs too.
    Returns the new model and the report; the input is never modified.
    """
    if not rules:
        raise UsageError("no rule given; list them with `convgraph rules`")
    selection = selection or Selection()
    selection.check()
    chosen = [get_rule(r) for r in rules]
    chosen.sort(key=lambda r: not r.prepass)  # pre-pass rules (fold-bn) first, others in the given order
    given = dict(params or {})
    known = {p.name for r in chosen for p in r.params}
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(f"--param {', '.join(unknown)}: not a parameter of {', '.join(r.name for r in chosen)}")
    resolved = [(r, r.resolve_params(given)) for r in chosen]
    original = source.to_model() if isinstance(source, ConvGraph) else None
    cg = load(original if original is not None else source, input_shapes, probe=probe,
              input_values=(input_options or {}).get("values"))
    original = original or cg.model  # as loaded (edits go to the view, never to it): no copy of the weights
    label = "<model>" if isinstance(source, (bytes, onnx.ModelProto, ConvGraph)) else str(source)
    report = RewriteReport(model=label, rules=[{"rule": r.name, "params": p, "exact": r.is_exact(p)} for r, p in resolved],
                           dry_run=dry_run, warnings=list(cg.warnings))
    if calib is not None and calibration is None and not dry_run:
        from .calibrate import calibrate

        opts = dict(input_options or {})
        calibration = calibrate(cg, calib, input_shapes=input_shapes, samples=opts.pop("samples", None),
                                seed=opts.pop("seed", 0), input_options=opts, provider=provider)
    checks: dict[int, regions.Region | str] | None = {} if verify and not dry_run else None
    for i, (rule, p) in enumerate(resolved):
        if i:
            cg = load(cg.to_model(), input_shapes, check=False, probe=probe)  # fresh shapes and records for the next rule
        _apply(cg, rule, p, selection, report, dry_run, calibration, checks)
    skipped = [f"{e.node} ({e.rule}): {e.reason.removeprefix('skipped: ')}" for e in report.explain if e.skipped]
    if skipped:
        report.warnings.append(("nothing rewritten: every conv the rules matched was skipped: " if not report.changes
                                else f"{len(skipped)} conv(s) skipped: ") + "; ".join(skipped))
    if dry_run:
        return RewriteResult(None, report)
    model = cg.to_model()
    if report.changes:
        _metadata(model, report.changes)
    report.checks = structural_checks(model)
    if verify and report.changes:
        numerics(original, model, report, checks, input_shapes, inputs, input_options or {}, atol, rtol, min_cosine,
                  provider)
    if bench and report.changes:
        from ..run.bench import bench as run_bench

        report.latency = run_bench([original, model], input_shapes=input_shapes, runs=bench_runs,
                                   threads=threads, provider=provider, names=["original", "rewritten"]).to_dict()
    return RewriteResult(model, report)
