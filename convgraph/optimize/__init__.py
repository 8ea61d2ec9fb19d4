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

The package's modules, bottom-up: ``report`` (tunables and the data the optimizer returns), ``judge`` (the
model-level metric), ``timing`` (1–2: the candidates and their one-layer latencies), ``greedy`` (4, and the
prefix search of 5), ``sequential`` (the sequential fit of 5), ``plot``; the optimizer itself (3, 5) is here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..analyze import analyze
from ..calibrate import Calibration, calibrate
from ..errors import UsageError
from ..graph import ConvGraph, load
from ..inputs import InputSet, make_inputs
from ..record import ConvRecord
from ..registry import get_rule
from ..rewrite import Selection
from ..rule import RuleContext, Skip
from .greedy import greedy_sequence, needs_shorter, plan_of, search
from .judge import Judge
from .plot import check_plot_path, plot_pareto
from .report import (
    DEFAULT_RANKS, DEFAULT_RULES, ERROR_FLOOR, LAYER_RANK_SHARES, MAX_MAC_RATIO, METRICS, PREDICTION_SLACK, SPEED_NOISE,
    STABLE_SHARE, Candidate, Choice, OptimizeReport, Point, Step,
)
from .sequential import FIT_CACHE_BYTES, fit_sequential
from .timing import TimingCache, _apply, _eta, _restore_names, _unique_names, candidates, stats_needed

__all__ = [
    "DEFAULT_RANKS", "DEFAULT_RULES", "ERROR_FLOOR", "ERRORS_SHARE", "FEW_CALIBRATION", "FEW_HELDOUT",
    "FIT_CACHE_BYTES", "LAYER_RANK_SHARES", "MAX_MAC_RATIO", "METRICS", "PREDICTION_SLACK", "SPEED_NOISE", "STABLE_SHARE", "Candidate",
    "Choice", "Judge", "OptimizeReport", "Point", "Step", "TimingCache", "candidates", "check_plot_path",
    "fit_sequential", "greedy_sequence", "needs_shorter", "optimize", "plan_of", "plot_pareto", "search",
]


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
    spliced into a copy of the model in the place of the last node they replace (no reload, analysis or
    checks of the whole model: they cost more than the fit). Through the engine (:func:`_apply`) when the
    replacement does not simply stand in for those nodes (an output of theirs it does not make, a reader
    between them); None when the rule refuses the conv with these statistics."""
    rec, rule = by_id[c.node], get_rule(c.rule)
    params = rule.resolve_params({k: str(v) for k, v in c.params.items()})
    ctx = RuleContext(cg, by_id, stats, params)
    why, found = rule.check(rec, ctx)
    if why is not None:
        return None
    try:
        rep = rule.make(rec, ctx, params, found)
    except (Skip, np.linalg.LinAlgError):
        return None
    made = {o for n in rep.nodes for o in n.output}
    removed = set(rep.removed or [rec.node_id])
    nodes = list(original.graph.node)
    at = [k for k, n in enumerate(nodes) if n.name in removed]
    i = at[-1] if len(at) == len(removed) else -1  # the replacement goes where the last replaced node was
    outs = {t for n in removed for t in cg.node(n).output if t and set(cg.consumers(t)) - removed}
    if i < 0 or not outs <= made or any(t in made for n in nodes[at[0]:i] if n.name not in removed for t in n.input):
        return _apply(original, {c.node: (c.rule, c.params)}, calibration=stats, input_shapes=input_shapes)[0]
    m = onnx.ModelProto()
    m.CopyFrom(original)
    del m.graph.node[:]
    m.graph.node.extend([n for n in nodes[:i] if n.name not in removed] + list(rep.nodes) + nodes[i + 1:])
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
    calibrated = sorted({n for c in cands if c.saving_ms > 0 for n in stats_needed(cg, by_id, c.node, c.rule, c.params)})
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

    from ..bench import bench

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
