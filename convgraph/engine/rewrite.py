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
from typing import Any, Collection, Iterator, Sequence

import numpy as np
import onnx

from . import regions
from ..run import tolerance
from ..analysis.analyze import analyze
from ..errors import UsageError
from ..model.graph import ConvGraph
from ..model.loader import load
from ..progress import staged
from ..model.record import REWRITES_KEY, ConvRecord
from ..model.reference import REFERENCE_DIM, at_reference, describe, reference_values
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


def _dearer(rule: Rule, params: dict, rec: ConvRecord, macs: int | None, before: int | None = None,
            where: str = "") -> str | None:
    before = rec.macs if before is None else before  # a rule replacing several convs says what they cost
    if rule.makes_dearer(params, before, macs):
        return (f"would add MACs ({where}{before:,} → {macs:,}), which an approximate rule is not for; "
                f"name the node with --nodes to rewrite it anyway")
    return None


def dearer_at_reference(rule: Rule, params: dict, rec: ConvRecord, values: dict[str, int]) -> str | None:
    """:func:`_dearer` for a conv whose MACs are a formula or unknown: decided at the reference size
    (:mod:`convgraph.model.reference`), where the rule's estimate has numbers."""
    if rec.macs is not None or rule.estimate is None:
        return None
    ref = at_reference(rec, values)
    if ref.macs is None:
        return None
    where = describe(values) if values else f"{REFERENCE_DIM} per unknown dim"
    return _dearer(rule, params, ref, rule.estimate(ref, params)[0], where=f"at {where}: ")


def _or(value, default):
    return default if value is None else value


@staged(lambda cg, rule, *_: f"applying {rule.name}")
def _apply(cg: ConvGraph, rule: Rule, params: dict, selection: Selection, report: RewriteReport,
           calibration: dict | None, checks: "dict[int, regions.Region | str] | None",
           pending: "dict[int, Pending] | None" = None) -> None:
    """One pass of ``rule`` over every selected conv of every (sub)graph; ``checks`` (when the result will be
    verified) gets, per change (its index in the report), the region to check it alone on, or why there is none;
    ``pending`` the changes whose new nodes are to be quantized (the int8 rule; any rule on a QDQ conv)."""
    analysis = analyze(cg, rewrites=False)  # the engine matches and builds; it reads no estimates
    values = reference_values(analysis.symbols)  # where MACs are formulas, "would add MACs" is decided there
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
            why = _dearer(rule, params, rec, estimate[0]) or dearer_at_reference(rule, params, rec, values)
        rep, skipped = None, False
        if why is None:  # a dry run builds too: it selects exactly as the real run (a later rule sees the result)
            try:
                rep = rule.make(rec, ctx, params, found)
            except (Skip, np.linalg.LinAlgError) as e:  # this conv cannot be rewritten after all: say why, go on
                why, skipped = "skipped: " + (str(e) if isinstance(e, Skip) else f"the fit failed ({e})"), True
            if rep is not None and guard_macs:
                why = _dearer(rule, params, rec, rep.macs_after, rep.macs_before)
        report.explain.append(Explanation(label, rule.name, why is None, why or "applies", skipped))
        if why is not None or rep is None:
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
        quantize = rep.quantize or _requantizes(graph, rec)
        if pending is not None and quantize is not None:
            pending[len(report.changes)] = Pending(graph, new_ids, quantize, old)
        before = _or(rep.macs_before, rec.macs)
        info = graph.shape_info(out)
        report.changes.append(Change(
            rule.name, label, rec.graph, rec.kind, rep.kind_after, before, rep.macs_after,
            _or(rep.params_before, rec.params), rep.params_after, rep.exact, out,
            [graph.node(n).name or n for n in new_ids], old_names,
            rep.weight_error, notes=rep.notes,
            tolerance=tolerance.for_type(info.elem_type if info else None).to_dict() if rep.exact else None,
            macs_before_expr=None if before is not None else _formula(records[rec.graph], removed)))


def _formula(records: dict[str, ConvRecord], nodes) -> Any:
    """The MACs of ``nodes`` (node ids; those not convs count none) as a formula, or None when one is unknown."""
    parts = [records[n].macs_expr for n in nodes if n in records]
    return None if not parts or any(p is None for p in parts) else sum(parts)


def _formulas_after(cg: ConvGraph, changes: list[Change]) -> None:
    """Give the changes whose MACs after are unknown (dims left dynamic) the formula of their new convs, read off
    ``cg``: the model the changes made, loaded afresh (its shapes inferred)."""
    todo = [c for c in changes if c.macs_after is None]
    if not todo:
        return
    records = {(r.graph, r.name or r.node_id): r for r in analyze(cg, rewrites=False).convs}
    for c in todo:
        convs = {n: records[(c.graph, n)] for n in c.new_nodes if (c.graph, n) in records}
        c.macs_after_expr = _formula(convs, list(convs))


@dataclass
class Pending:
    """A change whose new nodes the engine quantizes after the pass."""

    graph: ConvGraph
    ids: list[str]  # the new nodes, float
    how: dict  # {"calibration", "reduce_range"}, and "requantize": the replaced conv was QDQ
    old: regions.Captured | None  # the replaced nodes, for checking the quantized ones alone


def _requantizes(graph: ConvGraph, rec: ConvRecord) -> dict | None:
    """How a rewrite of ``rec`` is quantized again when ``rec`` is a QDQ conv (weights and input through
    DequantizeLinear, in the main graph, where its activations can be calibrated), else None."""
    from .quantize import made_by_dequantize

    if rec.graph or rec.weight_source != "DequantizeLinear" or made_by_dequantize(graph, rec.input) is None:
        return None
    int8 = get_rule("int8")
    return {**int8.resolve_params({}), "calibration": "minmax", "requantize": True}


@staged("quantizing")
def _quantize(cg: ConvGraph, report: RewriteReport, pending: dict[int, Pending], checks, floats: dict,
              feeds, rule: str) -> None:
    """Quantize the new nodes of each pending change with onnxruntime's quantizer (:mod:`convgraph.engine.quantize`):
    the activations that need ranges calibrated in one run over ``feeds()`` (None: no --calib given), then
    each change's nodes alone, in graph order, so that a change reading another's output keeps its scale."""
    from .quantize import CONVS, UNITS, calibrate_ranges, plan, predicted_noise, quantize_region, reduce_range, weight_error
    from ..model.weights import constant_value

    def boundary(p: Pending) -> list[str]:
        ids = set(p.ids)
        return [o for n in p.ids for o in p.graph.node(n).output
                if o and any(r not in ids for r in p.graph.consumers(o))]

    def io(p: Pending) -> bool:
        return not p.how.get("requantize")

    need = sorted({t for p in pending.values()
                   for t in plan(p.graph, [p.graph.node(n) for n in p.ids], boundary(p), quantize_io=io(p)).calibrate})
    how = next(iter(pending.values())).how
    ranges: dict = {}
    if need:
        if feeds is None:
            shown = ", ".join(need[:3]) + (f" and {len(need) - 3} more" if len(need) > 3 else "")
            raise UsageError(f"rule {rule} on quantized convs makes new activations ({shown}) whose int8 ranges must "
                             "be calibrated: give --calib (a folder of images or an .npz like the model's real data)")
        ranges = calibrate_ranges(cg.to_model(), need, feeds(), how["calibration"], types=cg.shapes)
    reduce = reduce_range(how["reduce_range"])
    first = {i: min(p.graph.graph.nodes[n]["order"] for n in p.ids) for i, p in pending.items()}
    for i in sorted(pending, key=lambda k: first[k]):
        p, c = pending[i], report.changes[i]
        nodes = [p.graph.node(n) for n in p.ids]
        plan_i = plan(p.graph, nodes, boundary(p), quantize_io=io(p))
        requantized = bool(how.get("requantize"))
        new, inits = quantize_region(p.graph, nodes, plan_i, ranges, method=how["calibration"], reduce=reduce,
                                     base=c.node, ops=CONVS if requantized else UNITS)
        if requantized and c.exact:  # held to the noise its new roundings add, not to float rounding
            float_bound = c.tolerance
            c.tolerance = tolerance.requantized(predicted_noise(new, inits, p.graph, plan_i, ranges)).to_dict()
        if requantized:
            c.kind_after += " (int8)"
            c.notes = c.notes.replace("weight dequantized into a float initializer (its QDQ quantization is not kept)",
                                      "rewritten in float from the dequantized weights, then quantized again")
        if c.weight_error is None:  # the int8 rule: how far quantizing moved the weights
            before = [constant_value(p.graph, n.input[1]) for n in nodes if n.op_type in CONVS]
            c.weight_error = weight_error([w for w in before if w is not None], new, inits)
        read = {t for n in nodes for t in n.input if t}
        new_ids = p.graph.replace(p.ids, new, inits)
        _drop_orphans(p.graph, read)
        c.new_nodes = [p.graph.node(n).name or n for n in new_ids]
        c.quantized = (f"int8 QDQ (onnxruntime's quantizer): per-channel int8 weights"
                       f"{' (7-bit: reduce_range)' if reduce else ''}, uint8 activations"
                       + (f", {how['calibration']} ranges of {len(plan_i.calibrate)} new tensor(s) on --calib"
                          if plan_i.calibrate else "") + (f", {len(plan_i.kept)} scale(s) kept" if plan_i.kept else ""))
        if checks is not None:
            if isinstance(checks.get(i), regions.Region) and requantized and c.exact:
                floats[i] = (checks[i], float_bound)
            region = regions.build(p.graph, p.old, [p.graph.node(n) for n in new_ids], cg.model) if p.old else None
            checks[i] = region or "the replaced nodes cannot run alone"


def _int8_check(model: onnx.ModelProto, report: RewriteReport, provider: str) -> None:
    """Whether onnxruntime runs the quantized changes' convs as int8 kernels (its optimized graph): in the checks,
    and a warning naming those it runs in float."""
    from .quantize import int8_kernels

    convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
    ours = [n for c in report.changes if c.quantized for n in c.new_nodes if n in convs]
    ran = int8_kernels(model, provider)
    floats = [n for n in ours if n not in ran]
    report.checks["int8 kernels"] = (f"{len(ours) - len(floats)} of {len(ours)} quantized convs run as QLinearConv "
                                     "(onnxruntime's optimized graph)")
    if floats:
        report.warnings.append(f"onnxruntime runs {len(floats)} quantized conv(s) in float, not as int8 kernels: "
                               + ", ".join(floats[:5]) + (" ..." if len(floats) > 5 else ""))


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
    checked with onnxruntime against the original: exact rewrites must keep each node's output within their
    tolerance (:mod:`convgraph.run.tolerance`: by type; for a requantized int8 conv, its requantization noise;
    else CheckFailed names the node); a rule that quantizes (``int8``) needs ``calib``; ``atol``/``rtol``/``min_cosine`` make the model
    outputs' tolerance a requirement (report.passed False when exceeded). ``probe`` measures the shapes
    onnx's inference loses (:func:`convgraph.model.probe.probe_shapes`), so that those convs get MACs too.
    ``dry_run`` builds and splices as the real run does (so it selects exactly the same changes, a later rule
    seeing an earlier one's result, a conv whose fit fails skipped) but neither calibrates, checks, times nor
    returns the model.
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
        valid = "; ".join(f"{r.name}: {', '.join(p.name for p in r.params) or 'none'}" for r in chosen)
        raise UsageError(f"--param {', '.join(unknown)}: not a parameter of {', '.join(r.name for r in chosen)} "
                         f"(parameters: {valid})")
    resolved = [(r, r.resolve_params(given)) for r in chosen]
    original = source.to_model() if isinstance(source, ConvGraph) else None
    cg = load(original if original is not None else source, input_shapes, probe=probe,
              input_values=(input_options or {}).get("values"))
    original = original or cg.model  # as loaded (edits go to the view, never to it): no copy of the weights
    label = "<model>" if isinstance(source, (bytes, onnx.ModelProto, ConvGraph)) else str(source)
    report = RewriteReport(model=label, rules=[{"rule": r.name, "params": p, "exact": r.is_exact(p)} for r, p in resolved],
                           dry_run=dry_run, warnings=list(cg.warnings))
    values = (input_options or {}).get("values")  # the Ifs the values decide stay decided in every reload
    quantizing = [r.name for r in chosen if r.quantizes]
    if quantizing and calib is None and not dry_run:
        raise UsageError(f"rule {quantizing[0]} calibrates int8 activation ranges on data: give --calib (a folder "
                         "of images or an .npz like the model's real data; calib= in Python)")
    if quantizing and not dry_run:
        from .quantize import ensure_opset

        converted, note = ensure_opset(cg.to_model())
        if note:
            cg = load(converted, input_shapes, check=False, probe=probe, input_values=values)
            report.notes.append(note)
    if isinstance(calib, Iterator):
        calib = list(calib)  # read twice: patch statistics and activation ranges
    opts = dict(input_options or {})
    samples, seed = opts.pop("samples", None), opts.pop("seed", 0)
    if calib is not None and calibration is None and not dry_run and len(quantizing) < len(chosen):
        from .calibrate import calibrate

        calibration = calibrate(cg, calib, input_shapes=input_shapes, samples=samples, seed=seed, input_options=opts,
                                provider=provider)
    feeds = None
    if calib is not None:
        from ..run.inputs import make_inputs

        def feeds():
            return make_inputs(original, calib, input_shapes=input_shapes, samples=samples, seed=seed, **opts)

    checks: dict[int, regions.Region | str] | None = {} if verify and not dry_run else None
    floats: dict = {}  # requantized exact changes: (their float replacement's region, its bound), checked too
    start = 0
    for i, (rule, p) in enumerate(resolved):
        if i:
            cg = load(cg.to_model(), input_shapes, check=False, probe=probe, input_values=values)  # fresh shapes
            _formulas_after(cg, report.changes[start:])
        start = len(report.changes)
        pending: dict[int, Pending] = {}
        _apply(cg, rule, p, selection, report, calibration, checks, None if dry_run else pending)
        if pending:
            _quantize(cg, report, pending, checks, floats, feeds, rule.name)
    if any(c.macs_after is None for c in report.changes[start:]):
        _formulas_after(load(cg.to_model(), input_shapes, check=False, probe=probe, input_values=values),
                        report.changes[start:])
    skipped = [f"{e.node} ({e.rule}): {e.reason.removeprefix('skipped: ')}" for e in report.explain if e.skipped]
    if skipped and not report.changes:  # matches existed and every one failed: a failure, not "nothing matched"
        report.passed = False
        report.failures.append("nothing rewritten: every conv the rules matched was skipped: " + "; ".join(skipped))
    elif skipped:
        report.warnings.append(f"{len(skipped)} conv(s) skipped: " + "; ".join(skipped))
    if dry_run:
        return RewriteResult(None, report)
    model = cg.to_model()
    if report.changes:
        _metadata(model, report.changes)
    report.checks = structural_checks(model)
    if verify and any(c.quantized for c in report.changes):
        _int8_check(model, report, provider)
    if verify and report.changes:
        numerics(original, model, report, checks, input_shapes, inputs, input_options or {}, atol, rtol, min_cosine,
                 provider, floats)
    if bench and report.changes:
        from ..run.bench import bench as run_bench

        report.latency = run_bench([original, model], input_shapes=input_shapes, runs=bench_runs,
                                   threads=threads, provider=provider, names=["original", "rewritten"]).to_dict()
    return RewriteResult(model, report)
