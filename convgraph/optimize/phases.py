"""The optimizer's phases, in the order :func:`convgraph.optimize.optimize` runs them.

``setup`` (load, input sets, judges) → ``baseline`` → ``time_candidates`` → ``calibrate_candidates`` →
``fit_candidates`` → ``judge_candidates`` → ``search_prefixes`` → ``finish``. Each takes the
:class:`Settings` it needs, the :class:`Plan` the phases before it filled in, and the one :class:`Deadline`
of the call; each books its time there and stops early when the deadline says so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from ..engine.calibrate import calibrate
from ..engine.rewrite import Selection
from ..errors import UsageError
from ..fit.calibration import Calibration
from ..model.graph import ConvGraph
from ..model.loader import load
from ..model.record import REWRITES_KEY, ConvRecord
from ..registry import get_rule
from ..run.inputs import InputSet, make_inputs
from .deadline import Deadline
from .estimate import layer_errors, scale_errors
from . import int8
from .fitting import Fitted, candidate_key, fit_all
from .greedy import greedy_sequence, needs_shorter, plan_of, search, to_largest_step
from .int8 import quantizes
from .judge import Judge
from .report import (
    DEFAULT_RANKS, DEFAULT_RULES, LAYER_RANK_SHARES, METRICS, PREDICTION_SLACK, SPEED_NOISE, STABLE_SHARE, Candidate,
    Choice, OptimizeReport, Point, Step,
)
from .samples import SPLIT_MARGIN, coverage, coverage_risk, features, sample_risks, split_budget
from .sequential import fit_sequential
from .timing import TimingCache, candidates, eta, restore_names, stats_needed, unique_names

#: The share of a time budget (from the start) after which no more candidate errors are measured: the
#: rest is left for building and judging prefixes.
ERRORS_SHARE = 0.6
#: ... and after which no more layers are timed (the candidates timed so far go on).
TIMING_SHARE = 0.35


@dataclass(frozen=True)
class Settings:
    """What the caller asked for (see :func:`convgraph.optimize.optimize` for each)."""

    budget: float = 0.99
    metric: str = "cosine"
    rules: tuple[str, ...] = DEFAULT_RULES
    ranks: tuple[int, ...] = DEFAULT_RANKS
    shares: tuple[str, ...] | None = None
    selection: Selection = field(default_factory=Selection)
    provider: str = "cpu"
    threads: int | None = 1
    input_shapes: Mapping[str, Sequence[int]] | None = None
    input_options: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[str, ...] | None = None
    probe: int = 8
    layer_runs: int = 30
    bench_runs: int = 20
    max_evals: int = 12
    quantile: float | None = None
    refit: bool = False
    estimate_errors: bool = True

    def check(self) -> None:
        """Usage errors now, before any work."""
        self.selection.check()
        if self.metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.metric in ("cosine", "top1") and not 0.0 < self.budget <= 1.0:
            raise UsageError(f"--budget for {self.metric} is the least allowed value, in (0, 1]; got {self.budget}")
        for r in self.rules:
            get_rule(r)
        for r in set(self.rules) & set(LAYER_RANK_SHARES):
            for share in self.shares or ():
                get_rule(r).resolve_params({"rank": str(share)})


@dataclass
class Built:
    """A prefix of the greedy sequence, built, judged and timed."""

    point: Point
    prefix: list[Step]
    model: onnx.ModelProto
    fit_notes: dict[str, str]
    per: dict[str, dict]


@dataclass
class Plan:
    """What the phases hand on to each other."""

    label: str
    cg: ConvGraph
    original: onnx.ModelProto
    records: list[ConvRecord]
    renamed: dict[str, str]
    calib_set: InputSet
    held_set: InputSet
    fit_set: InputSet
    judge_held: Judge
    judge_probe: Judge
    held_budget: float
    risks: list[str]
    coverage: tuple[float, str] | None
    notes: list[str] = field(default_factory=list)  # what the run itself has to say (cache, time budget)
    rules: tuple[str, ...] = DEFAULT_RULES  # the rules tried (the settings' less those the provider cannot use)
    baseline_ms: float = 0.0
    cands: list[Candidate] = field(default_factory=list)
    todo: list[Candidate] = field(default_factory=list)  # the candidates worth fitting
    stats: Calibration = field(default_factory=Calibration)
    fitted: Fitted | None = None
    steps: list[Step] = field(default_factory=list)
    built: list[Built] = field(default_factory=list)
    backed_off: list[Step] = field(default_factory=list)
    unbuilt: list[Step] = field(default_factory=list)  # of backed_off, those predicted past the budget, never built
    shorter: list[int] = field(default_factory=list)
    refitted: list[int] = field(default_factory=list)
    reference: onnx.ModelProto | None = None  # the model given (``original`` less the pre-pass folds): judged against
    folded: int = 0  # convs the exact pre-pass folds rewrote (``original`` is ``reference`` with them applied)

    @property
    def by_id(self) -> dict[str, ConvRecord]:
        return {r.node_id: r for r in self.records}

    def passing(self) -> list[Built]:
        return [b for b in self.built if b.point.passed]


Say = Callable[[str], None]


# ---- setup ---------------------------------------------------------------------------------------------------
def _input_set(model: onnx.ModelProto, inputs, s: Settings, what: str) -> InputSet:
    data = make_inputs(model, inputs, input_shapes=s.input_shapes, **dict(s.input_options))
    if len(data) == 0:
        raise UsageError(f"the {what} set is empty")
    return data


def subset(data: InputSet, idx: Sequence[int], describe: str) -> InputSet:
    """The samples ``idx`` of ``data``, keeping their names."""
    idx = list(idx)
    return InputSet(len(idx), lambda i: data[idx[i]], describe, data.specs, [data.names[i] for i in idx])


def input_coverage(original: onnx.ModelProto, records: Sequence[ConvRecord], calib: InputSet, held: InputSet,
              provider: str) -> tuple[float, str] | None:
    """(:func:`samples.coverage` of the two sets, the tensor) in the features of the deepest conv input
    (the smallest map, not a pooled 1×1 one, then the most channels): what the model has made of each
    sample by then."""
    from ..run.runtime import run_with_outputs

    shapes = {r.input: r.input_shape for r in records if r.input_shape and len(r.input_shape) >= 3
              and math.prod(r.input_shape[2:]) > 1}
    if not shapes:
        return None
    deep = min(shapes, key=lambda t: (math.prod(shapes[t][2:]), -shapes[t][1]))
    got = run_with_outputs(original, [deep], list(calib) + list(held), provider=provider)[deep]
    f = features(got)
    return coverage(f[:len(calib)], f[len(calib):]), deep


def setup(model, calib, heldout, s: Settings, deadline: Deadline) -> Plan:
    """Load the model, split the input sets, and make the judges of the held-out and probe samples."""
    from ..analysis.analyze import analyze

    with deadline.phase("setup"):
        s.check()
        if s.provider != "cpu" and "int8" in s.rules:
            # onnxruntime's CUDA provider runs a QDQ conv as DequantizeLinear → float Conv → QuantizeLinear: slower
            s = replace(s, rules=tuple(r for r in s.rules if r != "int8"))
            notes = [f"int8 left out on {s.provider}: onnxruntime runs QDQ convs as float convs there (int8 kernels "
                     "are the CPU provider's)"]
        else:
            notes = []
        shapes = {k: list(v) for k, v in s.input_shapes.items()} if s.input_shapes else None
        cg = load(model, shapes, probe=True, input_values=s.input_options.get("values"))
        if any(quantizes(get_rule(r)) for r in s.rules):
            from ..engine.quantize import ensure_opset

            converted, done = ensure_opset(cg.to_model())  # per-channel int8 needs opset 13 (PP-OCR det is 12)
            if done is not None:
                cg = load(converted, shapes, probe=True, input_values=s.input_options.get("values"))
                notes.append(done)
        renamed = unique_names(cg)  # plans go by node id: ids must survive rewriting (names restored at the end)
        reference = cg.to_model()  # what every result is judged and timed against
        prepass = tuple(r for r in s.rules if get_rule(r).prepass)
        folded = 0
        if prepass:  # exact folds (fold-bn) first, on every conv they match: the start of the search, no candidates
            cg, folds, folded = _prepass(cg, prepass, s, shapes)
            s = replace(s, rules=tuple(r for r in s.rules if r not in prepass))
            notes += folds
        records = [r for r in analyze(cg, rewrites=False).convs if not r.graph and s.selection.why_not(r) is None]
        original = cg.to_model()
        label = "<model>" if isinstance(model, (bytes, onnx.ModelProto, ConvGraph)) else str(model)
        calib_set = _input_set(original, calib, s, "calibration")
        if heldout is None:
            if len(calib_set) < 4:
                raise UsageError("give a held-out set (--heldout), or at least 4 calibration samples to split one off")
            held_set = subset(calib_set, range(3, len(calib_set), 4), f"every 4th of {calib_set.describe}")
            calib_set = subset(calib_set, [i for i in range(len(calib_set)) if i % 4 != 3], calib_set.describe)
        else:
            held_set = _input_set(original, heldout, s, "held-out")
        tensors = s.tensors
        if tensors is None and s.metric != "top1":
            from ..run import offsets

            roots = offsets.offset_roots(reference)
            if roots:  # YOLOv8's boxes: the anchor grid's magnitude hides the predicted distances in their cosine
                tensors = (*(o.name for o in reference.graph.output), *roots)
                notes.append(offsets.note(roots))
        # ``threads`` is for what is timed; runs that only compute (judging, calibration) use every core
        judge_held = Judge(reference, list(held_set), s.metric, s.provider, None, tensors, quantile=s.quantile,
                           names=held_set.names)
        risks = sample_risks(len(calib_set), len(held_set), heldout is None)
        covered = input_coverage(original, records, calib_set, held_set, s.provider) if heldout is not None else None
        if covered is not None and (risk := coverage_risk(*covered)) is not None:
            risks.append(risk)
        # candidates are fitted on most of the calibration set and their error measured on the rest (probe
        # samples spread over the set, so that they are like it): errors measured on the fitting data itself
        # flatter the fits that overfit
        n_probe = min(s.probe, len(calib_set) // 2)
        if n_probe < 1:
            raise UsageError("at least 2 calibration samples are needed (one to fit on, one to measure errors on)")
        probe_idx = sorted({int(i) for i in np.linspace(len(calib_set) - 1, 0, n_probe).round()})
        fit_set = subset(calib_set, [i for i in range(len(calib_set)) if i not in probe_idx], calib_set.describe)
        judge_probe = Judge(reference, [calib_set[i] for i in probe_idx], s.metric, s.provider, None, tensors,
                            quantile=s.quantile, strict=False, names=[calib_set.names[i] for i in probe_idx])
        # samples split off the calibration set flatter the fits: the search keeps a margin on them
        held_budget = s.budget if heldout is not None else split_budget(s.metric, s.budget)
    return Plan(label, cg, original, records, renamed, calib_set, held_set, fit_set, judge_held, judge_probe,
                held_budget, risks, covered, notes, rules=s.rules, reference=reference, folded=folded)


def _prepass(cg: ConvGraph, rules: Sequence[str], s: Settings, shapes) -> tuple[ConvGraph, list[str], int]:
    """``cg`` with the exact pre-pass rules applied to every conv they match (checked by the engine, as
    ``rewrite`` checks them), what was done, and on how many convs."""
    from ..engine.rewrite import rewrite

    res = rewrite(cg.to_model(), list(rules), selection=s.selection, input_shapes=shapes, verify=True,
                  provider=s.provider, input_options=dict(s.input_options))
    changes = res.report.changes
    if not changes or res.model is None:
        return cg, [], 0
    worst = max((c.output_error or 0.0) for c in changes)
    convs = len({c.node for c in changes})
    return (load(res.model, shapes, probe=True, input_values=s.input_options.get("values")),
            [f"{', '.join(rules)} first, on {convs} conv(s) (exact: each change's output error at most "
             f"{worst:.1e}; the search starts from the folded model, every result is judged and timed against "
             f"the model given)"], convs)


# ---- measuring -----------------------------------------------------------------------------------------------
def baseline(plan: Plan, s: Settings, deadline: Deadline) -> None:
    """The original model's latency."""
    from ..run.bench import bench

    with deadline.phase("baseline"):
        base = bench(plan.reference or plan.original, runs=s.bench_runs, warmup=3, provider=s.provider, threads=s.threads,
                     input_shapes=s.input_shapes, progress=False)
        plan.baseline_ms = base.models[0].median_ms


def time_candidates(plan: Plan, s: Settings, deadline: Deadline, say: Say, cache: TimingCache | None,
                    measured: Sequence[Candidate] | None) -> None:
    """Every candidate with its one-layer latency (``measured``: an earlier run's, reused); those worth
    fitting (saving time in at least STABLE_SHARE of the interleaved pairs) into ``plan.todo``."""
    with deadline.phase("layer timing"):
        if measured is not None:
            plan.cands = [Candidate(**asdict(c)) for c in measured]
        else:
            say("timing layers")
            plan.cands = candidates(plan.cg, plan.records, list(plan.rules), list(s.ranks), shares=s.shares,
                                    provider=s.provider, threads=s.threads, runs=s.layer_runs,
                                    warmup=max(3, s.layer_runs // 10), progress=say, cache=cache,
                                    stop=lambda: deadline.over(TIMING_SHARE))
            if cache is not None:
                cache.save()
                plan.notes.append(f"one-layer timings: {cache.hits} conv(s) from the cache ({cache.path}), "
                                  f"{cache.misses} timed")
            timed = len({c.node for c in plan.cands})
            if deadline.over(TIMING_SHARE) and timed < len(plan.records):
                plan.notes.append(f"--time-budget: {len(plan.records) - timed} of {len(plan.records)} convs had no "
                                  f"time left for timing their layers (the largest were timed first)")
    plan.todo = [c for c in plan.cands if c.saving_ms > 0 and (c.faster_share is None or c.faster_share >= STABLE_SHARE)]


def calibrate_candidates(plan: Plan, s: Settings, deadline: Deadline, say: Say) -> None:
    """The calibration statistics of the convs the candidates worth fitting are fitted on."""
    with deadline.phase("calibration"):
        say("calibrating")
        by_id = plan.by_id
        nodes = sorted({n for c in plan.todo for n in stats_needed(plan.cg, by_id, c.node, c.rule, c.params)})
        if nodes and not deadline.over(ERRORS_SHARE):
            plan.stats = calibrate(plan.original, plan.fit_set, nodes=nodes, input_shapes=s.input_shapes,
                                   provider=s.provider, threads=None)
        quantized = [(by_id[c.node], get_rule(c.rule).resolve_params({k: str(v) for k, v in c.params.items()}))
                     for c in plan.todo if quantizes(get_rule(c.rule))]
        ranges = int8.calibrate(plan.original, plan.cg, quantized, list(plan.fit_set)) \
            if quantized and not deadline.over(ERRORS_SHARE) else {}
        plan.fitted = Fitted(plan.original, plan.cg, by_id, plan.stats, s.input_shapes, ranges)


def fit_candidates(plan: Plan, deadline: Deadline, say: Say) -> None:
    """Each candidate worth fitting, fitted once (the largest savings first: when the time budget runs
    out, what is left unfitted is worth the least)."""
    fitted = plan.fitted
    assert fitted is not None
    with deadline.phase("fits"):
        plan.todo.sort(key=lambda c: -c.saving_ms)
        # int8 replacements go through onnxruntime's quantizer: in this process (quick, and not forked)
        quantized = [c for c in plan.todo if quantizes(get_rule(c.rule))]
        done = 0
        for c in quantized if fitted.ranges else ():
            if deadline.over(ERRORS_SHARE):
                break
            say(f"quantizing the int8 candidates: {done + 1}/{len(quantized)}")
            fitted.rep(c)
            done += 1
        rest = [c for c in plan.todo if c not in quantized]
        done += fit_all(fitted, rest, lambda: deadline.over(ERRORS_SHARE), say) if plan.stats else 0
        if done < len(plan.todo):
            plan.notes.append(f"--time-budget: {len(plan.todo) - done} of {len(plan.todo)} candidates (the smallest "
                              f"savings) had no time left for measuring their errors and were not considered")


def judge_candidates(plan: Plan, s: Settings, deadline: Deadline, say: Say) -> None:
    """Each fitted candidate's model-level error on the probe samples: two per conv judged in the whole
    model and the others scaled from their layer errors (``estimate_errors``), or every one judged."""
    fitted = plan.fitted
    assert fitted is not None
    with deadline.phase("candidate errors"):
        now = [c for c in plan.todo if fitted.reps.get(candidate_key(c.node, c.rule, c.params)) is not None]
        judged = layer_errors(fitted, now, plan.judge_probe, say) if s.estimate_errors else now
        t = time.perf_counter()
        for i, c in enumerate(judged):
            if deadline.over(ERRORS_SHARE):
                plan.notes.append(f"--time-budget: {len(judged) - i} of {len(judged)} candidate errors were not "
                                  f"judged in time; their convs' other options stand")
                break
            say(f"errors of the candidates, judged: {i + 1}/{len(judged)}{eta(t, i, len(judged))}")
            c.metric, c.error, _ = plan.judge_probe.judge(fitted.model({c.node: (c.rule, c.params)})[0])
        if s.estimate_errors:
            scale_errors(now)


# ---- the search ----------------------------------------------------------------------------------------------
def search_prefixes(plan: Plan, s: Settings, deadline: Deadline, say: Say) -> None:
    """Build, judge and time prefixes of the greedy sequence (:func:`search`), shorter ones where latency did
    not follow the layers' savings, and with ``refit`` the chosen one refitted in sequence."""
    from ..run.bench import bench

    fitted = plan.fitted
    assert fitted is not None
    allowance = plan.judge_held.allowance(plan.held_budget)
    fits: dict = {}  # fitted stages shared between sequential refits
    t = time.perf_counter()
    start = 1.0  # the search's starting model's time over the given model's (the exact folds, measured)

    def evaluate(prefix: list[Step], sequential: bool = False) -> tuple[bool, float]:
        steps = plan_of(prefix)
        n = len(plan.built) - int(plan.folded > 0)  # the folds alone are no prefix of the search
        say("search: building and judging the exact folds alone" if n < 0 else
            f"search: {'refitting in sequence' if sequential else 'building'} and judging {len(prefix)} steps "
            f"({len(steps)} convs), prefix {n + 1}{'' if sequential else f' of at most {s.max_evals}'}"
            f"{eta(t, n, s.max_evals) if not sequential else ''}")
        if sequential:
            m, changes = fit_sequential(plan.original, steps, plan.calib_set, input_shapes=s.input_shapes,
                                        provider=s.provider, cache=fits)
            fit_notes = {ch.node: ch.notes for ch in changes}
        else:
            m, fit_notes = fitted.model(steps)
        value, err, per = plan.judge_held.judge(m)
        b = bench([plan.reference or plan.original, m], runs=s.bench_runs, warmup=3, provider=s.provider, threads=s.threads,
                  input_shapes=s.input_shapes, names=["original", "optimized"], progress=False)
        orig_ms = b.models[0].median_ms
        won = float(np.mean(np.asarray(b.models[0].times_ms) > np.asarray(b.models[1].times_ms)))
        p = Point(len(prefix), len(steps), orig_ms * start - sum(st.saving_ms for st in prefix), orig_ms,
                  b.models[1].median_ms, b.ratios[0].median, value, err,
                  plan.judge_held.passes(value, plan.held_budget), won, fit="sequence" if sequential else "alone")
        plan.built.append(Built(p, list(prefix), m, fit_notes, per))
        return p.passed, err

    with deadline.phase("search"):
        if plan.folded:  # the exact folds alone: a result of their own, built and timed like a prefix
            evaluate([])
            folds = plan.built[-1].point
            start = folds.measured_ms / folds.original_ms  # predictions start from the folded model
            folds.predicted_ms = folds.measured_ms
        plan.steps = greedy_sequence(plan.cands, plan.baseline_ms * start)
        if plan.steps:
            plan.backed_off = search(plan.steps, evaluate, allowance=allowance, max_evals=s.max_evals,
                                     stop=deadline.over, unbuilt=plan.unbuilt)
        if fitted.joint_failed:
            plan.notes.append(f"int8 steps quantized one unit at a time (no joins between them): quantizing them "
                              f"together failed: {fitted.joint_failed}")
        # The sequence runs by saving per error, not by saving: later steps can cost more in the model than they
        # save alone (PP-OCR det: int8 units between float neighbours), so the passing prefix that ends at its
        # largest step is built too
        if plan.passing() and not deadline.over():
            best = max(plan.passing(), key=lambda b: b.point.speedup).prefix
            k = to_largest_step(best)
            if k < len(best) and all(len(b.prefix) != k for b in plan.built):
                evaluate(best[:k])
                plan.shorter.append(k)
        # Latency need not fall along the sequence (launch-bound on a GPU, more nodes can cost more than the
        # MACs save): while the fastest passing prefix is no faster than the original, or its measured latency
        # is far from the sum of its layers' savings, halve the shortest one.
        tries = max(2, s.max_evals - len(plan.built))
        while plan.passing() and tries and not deadline.over() and needs_shorter(
                max(plan.passing(), key=lambda b: b.point.speedup).point):
            shortest = min((b.prefix for b in plan.passing()), key=len)
            if len(shortest) < 2:
                break
            evaluate(shortest[:len(shortest) // 2])
            plan.shorter.append(len(shortest) // 2)
            tries -= 1
        if s.refit:
            # The search judged every conv fitted alone, on the original's statistics. The prefix it would
            # return and the shortest longer one that failed (which the refit may bring within the budget)
            # are refitted in sequence: each conv on the activations of the model rewritten so far, against
            # the original's outputs, so that later convs make up for earlier ones' errors.
            pick = pick_built(plan.passing())
            failed = [b for b in plan.built if not b.point.passed and (pick is None or b.point.steps > pick.point.steps)]
            for b in ([pick] if pick else []) + ([min(failed, key=lambda b: b.point.steps)] if failed else []):
                if deadline.over():
                    break
                evaluate(b.prefix, sequential=True)
                plan.refitted.append(len(b.prefix))


def pick_built(built: Sequence[Built]) -> Built | None:
    """Of built prefixes, the one to return: within timing noise of the fastest, the fewest steps, then the
    best metric (a prefix refitted in sequence beside the same one fitted alone)."""
    if not built:
        return None
    top = max(b.point.speedup for b in built)
    return min((b for b in built if b.point.speedup >= top - SPEED_NOISE * top),
               key=lambda b: (b.point.steps, -b.point.metric))


# ---- the result ----------------------------------------------------------------------------------------------
def finish(plan: Plan, s: Settings, deadline: Deadline) -> tuple[onnx.ModelProto, OptimizeReport]:
    """The model to return (the fastest passing prefix, or the original) with its record, and the report."""
    with deadline.phase("finish"):
        faster = [b for b in plan.passing() if b.point.speedup > 1.0]
        warned = list(plan.cg.warnings) + plan.risks  # what the result risks; the rest says what the run did
        notes = warned + plan.notes + _notes(plan, s, deadline, bool(faster))
        if faster:
            best = pick_built(faster)
            assert best is not None
            final, fit_notes, steps, per = best.model, best.fit_notes, plan_of(best.prefix), best.per
            value, measured_ms, speedup, predicted = (best.point.metric, best.point.measured_ms, best.point.speedup,
                                                      best.point.predicted_ms)
            baseline_ms = best.point.original_ms  # the chosen model's ms and speed-up come from one interleaved run
        else:
            final, fit_notes, steps = plan.reference or plan.original, {}, {}
            value, _, per = plan.judge_held.judge(final)
            baseline_ms = measured_ms = predicted = plan.baseline_ms
            speedup = 1.0
        by_cand = {candidate_key(c.node, c.rule, c.params): c for c in plan.cands}
        chosen = []
        for node, (rule, params) in steps.items():
            c = by_cand[candidate_key(node, rule, params)]
            chosen.append(Choice(node, rule, dict(params), c.kind_after, c.saving_ms, c.error, fit_notes.get(node, ""),
                                 c.faster_share, c.estimated))
        if chosen:
            final = tidy(final, plan, steps)
    seconds = {**deadline.spent, "total": deadline.elapsed()}
    report = OptimizeReport(
        model=plan.label, metric=s.metric, budget=s.budget, rules=list(plan.rules), provider=s.provider,
        threads=s.threads, calibration=plan.calib_set.describe, heldout=plan.held_set.describe,
        judged=list(plan.judge_held.names), baseline_ms=baseline_ms, predicted_ms=predicted,
        measured_ms=measured_ms, speedup=speedup, metric_value=value, passed=bool(faster),
        chosen=chosen, candidates=list(plan.cands), sequence=plan.steps,
        points=sorted((b.point for b in plan.built), key=lambda p: p.steps), outputs=per, seconds=seconds,
        notes=notes, warnings=warned, quantile=s.quantile, timed_out=deadline.ran_out_in is not None or any(
            n.startswith("--time-budget") for n in plan.notes),
        coverage=None if plan.coverage is None else plan.coverage[0], held_budget=plan.held_budget,
        folded=plan.folded if faster else 0,
        excluded={n: [{"sample": s_, "why": w} for s_, w in out] for n, out in plan.judge_held.excluded.items()})
    if (deciding := report.deciding()) is not None and deciding[1].get("weak"):
        report.notes.append(deciding[1]["weak"])  # the budget binds on a weak sample: say so
    return restore_names(final, plan.renamed), report


def _notes(plan: Plan, s: Settings, deadline: Deadline, faster: bool) -> list[str]:
    notes = []
    if (note := deadline.note()) is not None:
        notes.append(note + ("; the result is the best verified so far" if plan.built else ""))
    repeated = sorted(n for n, old in plan.renamed.items() if old)
    if repeated:
        notes.append(f"{len(repeated)} op(s) shared a name with another (onnxruntime refuses such a model): the "
                     f"result names them after their ids: {', '.join(repeated[:5])}{' …' if len(repeated) > 5 else ''}")
    if plan.held_budget != s.budget:
        notes.append(f"the held-out samples were split off the calibration set, which flatters the fits: the search "
                     f"held {s.metric} ≥ {plan.held_budget:.6g} on them (the budget {s.budget:g} with its allowed "
                     f"error divided by {SPLIT_MARGIN:g}; on YOLOv8n split-off crops judged 0.9909 where other photos "
                     f"gave 0.972)")
    for name, out in plan.judge_held.excluded.items():
        notes.append(f"{len(out)} of {len(plan.held_set)} held-out sample(s) left out of judging {name!r}, their "
                     f"reference saying nothing to compare with: " + "; ".join(f"{s_} ({why})" for s_, why in out))
    if plan.shorter:
        notes.append(f"latency need not follow the layers' measured savings: also built the prefix that ends at the "
                     f"largest step, and shorter ones where a prefix was no faster than the original or over "
                     f"{PREDICTION_SLACK - 1:.0%} slower than predicted: {', '.join(map(str, plan.shorter))} steps")
    passing = plan.passing()
    if passing and not faster:
        notes.append(f"no prefix within the budget ran faster than the original (best measured speed-up "
                     f"{max(b.point.speedup for b in passing):.3f}×, although the one-layer timings predicted "
                     f"savings)")
    if not faster and not passing:
        notes.append("no rewrite kept the held-out metric within the budget" if plan.built else
                     "no prefix was built" if plan.steps else
                     f"no time was left for {deadline.ran_out_in or 'the search'}" if deadline.ran_out_in else
                     "no candidate rewrite saves measured time")
    if plan.refitted:
        notes.append(f"refitted in sequence (each conv on the activations of the model rewritten so far): the "
                     f"prefix(es) of {', '.join(map(str, plan.refitted))} steps")
    failed = [b for b in plan.backed_off if b not in plan.unbuilt]
    if failed:  # per conv, its step that failed (the conv's later steps went with it)
        first = {b.node: b for b in reversed(failed)}
        notes.append("backed off (each turned a passing prefix into a failing one): " + ", ".join(
            f"{b.node} {b.rule} {','.join(f'{k}={v}' for k, v in b.params.items())}" for b in reversed(first.values())))
    if plan.unbuilt:
        convs = len({b.node for b in plan.unbuilt})
        notes.append(f"left out unbuilt: {len(plan.unbuilt)} step(s) of {convs} conv(s), each predicted (its error "
                     f"alone, scaled as the built prefixes measured) to take the longest passing prefix past the budget")
    return notes


def tidy(model: onnx.ModelProto, plan: Plan, steps: Mapping[str, tuple[str, dict]]) -> onnx.ModelProto:
    """The returned model as ``rewrite`` writes one: no initializer or Constant left that nothing reads (the
    replaced convs' weights), and the rewrite record (``convgraph.rewrites``) that ``verify --localize``
    maps nodes through."""
    assert plan.fitted is not None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    drop_unread(m.graph)
    names = {n.name for n in m.graph.node}
    rewrites = []
    for node, (rule, params) in steps.items():
        rep = plan.fitted.rep_of(node, rule, params)
        if rep is None:
            continue
        new = [n.name for n in rep.nodes if n.name in names]
        rewrites.append({"rule": rule, "params": dict(params), "old_nodes": list(rep.removed or [node]),
                         "new_nodes": new, "exact": bool(rep.exact), "graph": "",
                         "output": plan.by_id[node].output})
    for p in list(m.metadata_props):
        if p.key == REWRITES_KEY:
            rewrites = json.loads(p.value).get("rewrites", []) + rewrites
            m.metadata_props.remove(p)
    m.metadata_props.add(key=REWRITES_KEY, value=json.dumps({"rewrites": rewrites, "tensor_map": {}}))
    return m


def drop_unread(graph: onnx.GraphProto) -> None:
    """Remove from ``graph`` the initializers and Constant nodes whose values no node (subgraph bodies
    included) and no graph output reads."""

    def reads(g: onnx.GraphProto, into: set[str]) -> None:
        for n in g.node:
            into.update(t for t in n.input if t)
            for a in n.attribute:
                for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    reads(body, into)
        into.update(o.name for o in g.output)

    while True:
        read: set[str] = set()
        reads(graph, read)
        dead_inits = [t for t in graph.initializer if t.name not in read]
        dead_consts = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in read]
        if not dead_inits and not dead_consts:
            return
        gone = {t.name for t in dead_inits}
        kept = [t for t in graph.initializer if t.name not in gone]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        inputs = [i for i in graph.input if i.name not in gone]
        del graph.input[:]
        graph.input.extend(inputs)
        for n in dead_consts:
            graph.node.remove(n)
