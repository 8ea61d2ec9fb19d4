"""Error-budgeted optimization: choose, per conv, the rewrite that buys the most measured speed for the least
model-level error, fit it on calibration data, and prove the result on held-out inputs.

1. **Candidates.** Every selected conv × every given rule that matches it × each rank (``ranks``) or the
   rule's defaults, keeping those that cut MACs.
2. **Latency, measured.** Each conv and its candidate replacements run as one-layer models in
   onnxruntime, interleaved (:func:`convgraph.run.bench.bench`); a candidate's saving is the layer's measured
   time before minus after (MAC counts mislead: depthwise convs are memory-bound).
3. **Error, measured.** Each candidate whose layer reliably beat the original is fitted once on the
   calibration statistics of the original model (:mod:`convgraph.engine.calibrate`, :mod:`convgraph.fit`; in a
   process per core), and its replacement kept. Its layer error is measured by running it alone on the
   conv's inputs; per conv the options with the least and the most layer error are spliced into the
   model and its output error judged on calibration inputs kept out of the fit (1 − cosine, or
   noise/signal power for ``snr``), the others' scaled from their layer errors.
4. **Greedy.** Per conv the options form a chain of increasingly aggressive steps (the lower convex
   hull of error against saving); all steps are ordered by saving per unit of error. The prefix whose
   predicted error (errors add) fits the budget is the first guess.
5. **Prefixes, check, back-off.** A prefix is built by splicing in the candidates' replacements as fitted
   in 3 and judged on the held-out inputs; the longest prefix within the budget is found by bisection,
   and a step that alone turns a passing prefix into a failing one is backed off and the search goes on
   past it (:func:`search`). Every evaluated prefix is also timed: the measured error–latency front.
6. **Sequential refit** (``refit``). The prefix to return, and the next longer one, are rebuilt conv by conv in
   topological order, each fitted on the activations of the model rewritten so far against the original's
   outputs (cross moments), so that later convs make up for earlier ones' errors; judged and timed again.

The package's modules, bottom-up: ``report`` (tunables and the data the optimizer returns), ``judge`` (the
model-level metric), ``timing`` (1–2: the candidates and their one-layer latencies), ``greedy`` (4, and the
prefix search of 5), ``sequential`` (6), ``samples`` (what a calibration and held-out set risk), ``plot``; the optimizer
itself (3, 5) is here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..analysis.analyze import analyze
from ..fit.calibration import Calibration
from ..engine.calibrate import calibrate
from ..errors import CheckFailed, UsageError
from ..model.graph import ConvGraph
from ..model.loader import load
from ..run.inputs import InputSet, make_inputs
from ..model.record import ConvRecord
from ..registry import get_rule
from ..engine.rewrite import Selection
from ..rule import RuleContext, Skip
from .greedy import greedy_sequence, needs_shorter, plan_of, search
from .judge import Judge
from .plot import check_plot_path, plot_pareto
from .report import (
    DEFAULT_RANKS, DEFAULT_RULES, ERROR_FLOOR, LAYER_RANK_SHARES, MAX_MAC_RATIO, METRICS, PREDICTION_SLACK, SPEED_NOISE,
    STABLE_SHARE, Candidate, Choice, OptimizeReport, Point, Step,
)
from .samples import (
    FEW_CALIBRATION, FEW_HELDOUT, SPLIT_MARGIN, coverage, coverage_risk, features, sample_risks, split_budget,
)
from .sequential import FIT_CACHE_BYTES, fit_sequential
from .timing import TimingCache, apply_plan, eta, restore_names, unique_names, candidates, stats_needed

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
    return InputSet(len(idx), lambda i: data[idx[i]], describe, data.specs, [data.names[i] for i in idx])


#: The share of a time budget (from the start) after which no more candidate errors are measured: the
#: rest is left for building and judging prefixes.
ERRORS_SHARE = 0.6


def _coverage(original: onnx.ModelProto, records: Sequence[ConvRecord], calib: InputSet, held: InputSet,
              provider: str) -> tuple[float, str] | None:
    """(:func:`samples.coverage` of the two sets, the tensor) in the features of the deepest conv input
    (the smallest map, not a pooled 1×1 one, then the most channels): what the model has made of each
    sample by then."""
    from ..run.runtime import run_with_outputs

    recs = [r for r in records if r.input_shape and len(r.input_shape) >= 3 and math.prod(r.input_shape[2:]) > 1]
    if not recs:
        return None
    deep = min(recs, key=lambda r: (math.prod(r.input_shape[2:]), -r.input_shape[1]))
    got = run_with_outputs(original, [deep.input], list(calib) + list(held), provider=provider)[deep.input]
    f = features(got)
    return coverage(f[:len(calib)], f[len(calib):]), deep.input


def replacement(cg: ConvGraph, by_id: Mapping[str, ConvRecord], node: str, rule_name: str,
                 given: Mapping[str, Any], stats):
    """``rule_name``'s replacement of conv ``node`` with params ``given``, fitted on ``stats`` (None when the
    rule refuses the conv with these statistics)."""
    rec, rule = by_id[node], get_rule(rule_name)
    params = rule.resolve_params({k: str(v) for k, v in given.items()})
    ctx = RuleContext(cg, by_id, stats, params)
    why, found = rule.check(rec, ctx)
    if why is not None:
        return None
    try:
        return rule.make(rec, ctx, params, found)
    except (Skip, np.linalg.LinAlgError):
        return None


def place_replacement(nodes: Sequence[onnx.NodeProto], order: Mapping[str, int], cg: ConvGraph, rep, rec: ConvRecord) -> int | None:
    """Where ``rep`` can be spliced into ``nodes`` (``order``: name → index) in place of the nodes it
    replaces: the index of the last of them; None when it does not simply stand in for them (a node it
    replaces is not there, an output of theirs read elsewhere that it does not make, a reader of its
    outputs between them)."""
    made = {o for n in rep.nodes for o in n.output}
    removed = set(rep.removed or [rec.node_id])
    at = sorted(order[n] for n in removed if n in order)
    if len(at) != len(removed):
        return None
    outs = {t for n in removed for t in cg.node(n).output if t and set(cg.consumers(t)) - removed}
    if not outs <= made or any(t in made for n in nodes[at[0]:at[-1]] if n.name not in removed for t in n.input):
        return None
    return at[-1]


def splice(original: onnx.ModelProto, reps: Sequence[tuple[int, Any]]) -> onnx.ModelProto:
    """``original`` with each replacement of ``reps`` ((index of the last node it replaces, replacement),
    :func:`place_replacement`) in place of the nodes it replaces: no reload, analysis or checks of the whole model
    (they cost more than the fits). The convs' own weights stay, unread: onnxruntime drops them."""
    m = onnx.ModelProto()
    m.CopyFrom(original)
    gone = {n for _, rep in reps for n in rep.removed}
    at = {i: rep for i, rep in reps}
    nodes = []
    for i, n in enumerate(original.graph.node):
        if i in at:
            nodes += list(at[i].nodes)
        elif n.name not in gone:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for _, rep in reps:
        m.graph.initializer.extend(rep.initializers)
    return m


def candidate_key(node: str, rule: str, params: Mapping[str, Any]) -> tuple[str, str, str]:
    return node, rule, repr(sorted(params.items()))


class Fitted:
    """The candidates' replacements fitted on the original model's calibration statistics, kept so that a
    candidate alone or a prefix of the search is built by splicing them into a copy of the model
    (:meth:`model`) instead of refitting and running the engine."""

    def __init__(self, original: onnx.ModelProto, cg: ConvGraph, by_id: Mapping[str, ConvRecord], stats,
                 input_shapes):
        self.original, self.cg, self.by_id, self.stats, self.input_shapes = original, cg, by_id, stats, input_shapes
        self.reps: dict[tuple[str, str, str], Any] = {}
        self.nodes = list(original.graph.node)
        self.order = {n.name: i for i, n in enumerate(self.nodes)}

    def rep(self, c: Candidate):
        """Candidate ``c``'s replacement, fitted once (None when its rule refuses the conv)."""
        return self.rep_of(c.node, c.rule, c.params)

    def rep_of(self, node: str, rule: str, params: Mapping[str, Any]):
        k = candidate_key(node, rule, params)
        if k not in self.reps:
            self.reps[k] = replacement(self.cg, self.by_id, node, rule, params, self.stats)
        return self.reps[k]

    def place(self, rep, node: str) -> int | None:
        """:func:`place_replacement` in the original model."""
        return place_replacement(self.nodes, self.order, self.cg, rep, self.by_id[node])

    def model(self, plan: Mapping[str, tuple[str, dict]]) -> tuple[onnx.ModelProto, dict[str, str]]:
        """The original with ``plan`` applied, each conv fitted alone on the original's statistics; and per
        conv the fit's notes. Replacements that do not simply stand in for their conv go through the engine."""
        reps, engine, notes = [], {}, {}
        for node, (rule, params) in plan.items():
            rep = self.rep_of(node, rule, params)
            if rep is None:
                raise CheckFailed(f"{rule} refuses {node} with the calibration statistics")
            at = self.place(rep, node)
            if at is not None:
                reps.append((at, rep))
                notes[node] = rep.notes
            else:
                engine[node] = (rule, params)
        m = splice(self.original, reps)
        if engine:
            m, changes = apply_plan(m, engine, calibration=self.stats, input_shapes=self.input_shapes)
            notes.update({ch.node: ch.notes for ch in changes})
        return m, notes


def _measure(original, cg, records, rules, ranks, shares, fit_set, judge: Judge, *, provider, threads, input_shapes,
             layer_runs: int, seconds: dict, say, deadline: float, cache: TimingCache | None,
             notes: list[str], measured: Sequence[Candidate] | None,
             estimate: bool = True) -> tuple[list[Candidate], Fitted]:
    """Phases 1–3: candidates, their one-layer latencies, and each one's error alone (fitted on ``fit_set``);
    past ``deadline`` the remaining candidates get no error (they are not chosen). Only candidates that
    save time in at least STABLE_SHARE of the interleaved pairs are fitted: the others are never chosen.
    With ``estimate`` only two candidates per conv are judged in the whole model, the others' errors
    scaled from their layer errors (:func:`layer_errors`). With ``measured`` (an earlier run's
    candidates) only the calibration is done."""
    t = time.perf_counter()
    by_id = {r.node_id: r for r in records}
    if measured is not None:
        cands = [Candidate(**asdict(c)) for c in measured]
    else:
        say("timing layers")
        cands = candidates(cg, records, rules, ranks, shares=shares, provider=provider, threads=threads,
                           runs=layer_runs, warmup=max(3, layer_runs // 10), progress=say, cache=cache)
        seconds["layer_latency"] = time.perf_counter() - t
    todo = [c for c in cands if c.saving_ms > 0 and (c.faster_share is None or c.faster_share >= STABLE_SHARE)]
    t = time.perf_counter()
    say("calibrating")
    calibrated = sorted({n for c in todo for n in stats_needed(cg, by_id, c.node, c.rule, c.params)})
    stats = calibrate(original, fit_set, nodes=calibrated, input_shapes=input_shapes, provider=provider,
                      threads=None) if calibrated else Calibration()
    seconds["calibration"] = time.perf_counter() - t
    fitted = Fitted(original, cg, by_id, stats, input_shapes)
    if measured is not None:
        return cands, fitted
    t = time.perf_counter()
    # the largest savings first: when a time budget runs out, what is left unmeasured is worth the least
    todo.sort(key=lambda c: -c.saving_ms)
    done = fit_all(fitted, todo, deadline, say)
    if done < len(todo):
        notes.append(f"--time-budget: {len(todo) - done} of {len(todo)} candidates (the smallest savings) had no "
                     f"time left for measuring their errors and were not considered")
    seconds["fits"] = time.perf_counter() - t
    t = time.perf_counter()
    fitted_now = [c for c in todo if fitted.reps.get(candidate_key(c.node, c.rule, c.params)) is not None]
    judged = layer_errors(fitted, fitted_now, judge, say) if estimate else fitted_now
    t_judge = time.perf_counter()
    for i, c in enumerate(judged):
        say(f"errors of the candidates, judged: {i + 1}/{len(judged)}{eta(t_judge, i, len(judged))}")
        c.metric, c.error, _ = judge.judge(fitted.model({c.node: (c.rule, c.params)})[0])
    if estimate:
        scale_errors(fitted_now)
    seconds["candidate_errors"] = time.perf_counter() - t
    return cands, fitted


#: Candidates fitted per task when the fits run in several processes.
FIT_CHUNK = 4
_FITTING: "Fitted | None" = None  # what forked fitting processes inherit


def _fit_chunk(cands: Sequence[Candidate]) -> list:
    assert _FITTING is not None
    return [_FITTING.rep(c) for c in cands]


def _blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS to ``n`` threads (numpy's own wheels bundle it); False where that is not
    possible (another BLAS): then the fits are not spread over processes, whose BLAS threads would
    contend (YOLOv8n: 259 s in two processes of two BLAS threads each, 58 s of one each, 78 s in one)."""
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(n)
                return True
    return False


def _one_blas_thread() -> None:
    _blas_threads(1)


def fit_all(fitted: Fitted, todo: Sequence[Candidate], deadline: float, say) -> int:
    """Fit ``todo`` in order into ``fitted.reps`` until ``deadline``; returns how many were fitted. On a
    machine of several cores where processes fork (Linux) and numpy's OpenBLAS can be told its thread
    count, in a process per core of one BLAS thread each: the fits are numpy on small matrices, which BLAS
    threads speed up little (YOLOv8n's low-rank fits: 37.9 s on one thread, 31.4 s on two)."""
    import multiprocessing as mp

    global _FITTING
    t = time.perf_counter()
    workers = min(os.cpu_count() or 1, 8)
    if (workers < 2 or "fork" not in mp.get_all_start_methods() or len(todo) < 2 * FIT_CHUNK
            or not _blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", 0)) or os.cpu_count() or 1)):
        for i, c in enumerate(todo):
            if time.perf_counter() > deadline:
                return i
            say(f"fitting the candidates: {i + 1}/{len(todo)}{eta(t, i, len(todo))}")
            fitted.rep(c)
        return len(todo)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [list(todo[i:i + FIT_CHUNK]) for i in range(0, len(todo), FIT_CHUNK)]
    _FITTING, done = fitted, 0
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_one_blas_thread) as pool:
            futures = [pool.submit(_fit_chunk, ch) for ch in chunks]
            for ch, fut in zip(chunks, futures):
                if time.perf_counter() > deadline:
                    for f in futures:
                        f.cancel()
                    break
                for c, rep in zip(ch, fut.result()):
                    fitted.reps[candidate_key(c.node, c.rule, c.params)] = rep
                done += len(ch)
                say(f"fitting the candidates: {done}/{len(todo)} ({workers} processes){eta(t, done, len(todo))}")
    finally:
        _FITTING = None
    return done


#: Activations (bytes) held at once while measuring the candidates' layer errors.
LAYER_ERROR_BYTES = 256 << 20


def layer_errors(fitted: Fitted, cands: Sequence[Candidate], judge: Judge, say) -> list[Candidate]:
    """Each candidate's layer error (``layer_error``: ‖y′ − y‖² / ‖y‖² of its replacement run alone in
    onnxruntime on the conv's inputs in the original model, on the judge's samples); returns the candidates
    whose model-level error must be judged: per conv the ones with the least and the most layer error
    (the others' are scaled from them, :func:`scale_errors`), and every one without a layer error (a
    rewrite of more than the conv: ``prune``)."""
    from ..run.runtime import create_session, run, run_with_outputs
    from .timing import layer_model

    by_node: dict[str, list[Candidate]] = {}
    judged = []
    for c in cands:
        rep = fitted.rep(c)
        if (not rep.removed or list(rep.removed) == [c.node]) and fitted.place(rep, c.node) is not None:
            by_node.setdefault(c.node, []).append(c)  # it stands in for the conv alone: a one-layer model
        else:
            judged.append(c)
    batches: list[list[str]] = [[]]
    size = 0
    for node in by_node:  # convs whose inputs and outputs on every sample fit in LAYER_ERROR_BYTES at once
        rec = fitted.by_id[node]
        b = 4 * len(judge.feeds) * (math.prod(rec.input_shape) + math.prod(rec.output_shape))
        if batches[-1] and size + b > LAYER_ERROR_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(node)
        size += b
    done = 0
    for batch in batches:
        recs = [fitted.by_id[n] for n in batch]
        acts = run_with_outputs(fitted.original, [t for r in recs for t in (r.input, r.output)], judge.feeds,
                                provider=judge.provider, threads=judge.threads)
        for rec in recs:
            done += 1
            say(f"layer errors of the candidates: conv {done}/{len(by_node)}")
            ref = acts[rec.output]
            power = sum(float(np.sum(np.square(y, dtype=np.float64))) for y in ref)
            for c in by_node[rec.node_id]:
                rep = fitted.rep(c)
                sess = create_session(layer_model(fitted.cg, rec, rep.nodes, rep.initializers),
                                      provider=judge.provider, threads=judge.threads)
                diff = sum(float(np.sum(np.square(run(sess, {rec.input: x})[0] - y, dtype=np.float64)))
                           for x, y in zip(acts[rec.input], ref))
                c.layer_error = diff / power if power > 0 else (0.0 if diff == 0 else math.inf)
            opts = sorted(by_node[rec.node_id], key=lambda c: c.layer_error)
            judged += [opts[0]] + ([opts[-1]] if len(opts) > 1 else [])
        del acts
    return judged


def scale_errors(cands: Sequence[Candidate]) -> None:
    """Model-level errors of the candidates not judged, from their layer errors: per conv, the power law
    through its two judged candidates (error ∝ layer error^p, p kept within [0.5, 2]; p = 1 with one),
    marked ``estimated``. A model's error for a small change in one layer grows with the change's power
    (1 − cosine ≈ ½‖δ‖²/‖y‖², δ linear in the layer's error), so a conv's options keep their order and
    the measured pair sets the conv's sensitivity."""
    by_node: dict[str, list[Candidate]] = {}
    for c in cands:
        if c.layer_error is not None:
            by_node.setdefault(c.node, []).append(c)
    for opts in by_node.values():
        ref = [c for c in opts if c.error is not None and math.isfinite(c.error) and c.layer_error > 0]
        if not ref:
            continue
        lo, hi = min(ref, key=lambda c: c.layer_error), max(ref, key=lambda c: c.layer_error)
        p = 1.0
        if hi.layer_error > lo.layer_error and lo.error > 0 and hi.error > 0:
            p = math.log(hi.error / lo.error) / math.log(hi.layer_error / lo.layer_error)
            p = min(max(p, 0.5), 2.0)
        for c in opts:
            if c.error is None and math.isfinite(c.layer_error):
                near = lo if abs(math.log(max(c.layer_error, 1e-30) / lo.layer_error)) <= abs(
                    math.log(max(c.layer_error, 1e-30) / hi.layer_error)) else hi
                c.error = near.error * (c.layer_error / near.layer_error) ** p if c.layer_error > 0 else 0.0
                c.estimated = True


def _pick(built: Sequence[tuple]) -> tuple | None:
    """Of built prefixes (point first), the one to return: within timing noise of the fastest, the fewest
    steps, then the best metric (a prefix refitted in sequence beside the same one fitted alone)."""
    if not built:
        return None
    top = max(b[0].speedup for b in built)
    return min((b for b in built if b[0].speedup >= top - SPEED_NOISE * top), key=lambda b: (b[0].steps, -b[0].metric))


def optimize(model, calib, heldout=None, *, budget: float = 0.99, metric: str = "cosine",
             rules: Sequence[str] = DEFAULT_RULES, ranks: Sequence[int] = DEFAULT_RANKS,
             shares: Sequence[str] | None = None, selection: Selection | None = None, provider: str = "cpu", threads: int | None = 1,
             input_shapes: Mapping[str, Sequence[int]] | None = None, input_options: Mapping[str, Any] | None = None,
             tensors: Sequence[str] | None = None, measured: Sequence[Candidate] | None = None, probe: int = 8,
             layer_runs: int = 30, bench_runs: int = 20, max_evals: int = 12, quantile: float | None = None,
             time_budget: float | None = None, timing_cache: "TimingCache | str | os.PathLike | None" = None,
             refit: bool = False, estimate_errors: bool = True, progress=None) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Rewrite the convs of ``model`` for the most measured speed within ``budget`` on held-out inputs.

    ``calib``/``heldout``: what :func:`convgraph.run.inputs.make_inputs` takes (an image folder, an ``.npz``, a
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
    ``max_evals``: prefixes built and judged in the search, each conv fitted alone on the original's
    statistics; with ``refit`` the one returned and the next longer one are then refitted in sequence
    (:func:`fit_sequential`). ``estimate_errors``: judge two candidates per conv in the whole model and
    scale the others' errors from their layer errors (else judge every one). ``progress``: a callable taking one-line
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
    renamed = unique_names(cg)  # plans go by node id: ids must survive rewriting (names restored at the end)
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
    judge_held = Judge(original, list(held_set), metric, provider, None, tensors, quantile=quantile,
                       names=held_set.names)
    risks = sample_risks(len(calib_set), len(held_set), heldout is None)
    covered = _coverage(original, records, calib_set, held_set, provider) if heldout is not None else None
    if covered is not None and (risk := coverage_risk(*covered)) is not None:
        risks.append(risk)
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

    from ..run.bench import bench

    base = bench(original, runs=bench_runs, warmup=3, provider=provider, threads=threads,
                 input_shapes=input_shapes, progress=False)
    baseline_ms = base.models[0].median_ms
    cache = timing_cache if isinstance(timing_cache, TimingCache) or timing_cache is None else \
        TimingCache(timing_cache)
    # the candidates' errors may take a share of a time budget; the rest is the search's
    errors_until = t_start + ERRORS_SHARE * time_budget if time_budget is not None else math.inf
    cands, fitted = _measure(original, cg, records, rules, ranks, shares, fit_set, judge_probe, provider=provider,
                             threads=threads, input_shapes=input_shapes, layer_runs=layer_runs, seconds=seconds,
                             say=say, deadline=errors_until, cache=cache, notes=run_notes, measured=measured,
                             estimate=estimate_errors)
    if cache is not None and measured is None:
        cache.save()
        run_notes.append(f"one-layer timings: {cache.hits} conv(s) from the cache ({cache.path}), "
                         f"{cache.misses} timed")

    steps = greedy_sequence(cands, baseline_ms)
    # samples split off the calibration set flatter the fits: the search keeps a margin on them
    held_budget = budget if heldout is not None else split_budget(metric, budget)
    allowance = judge_held.allowance(held_budget)

    t = time.perf_counter()
    points: list[Point] = []
    built: list[tuple[Point, list[Step], onnx.ModelProto, dict, dict]] = []

    def evaluate(prefix: list[Step], sequential: bool = False) -> tuple[bool, float]:
        plan = plan_of(prefix)
        say(f"search: {'refitting in sequence' if sequential else 'building'} and judging {len(prefix)} steps "
            f"({len(plan)} convs), prefix {len(points) + 1}{'' if sequential else f' of at most {max_evals}'}"
            f"{eta(t, len(points), max_evals) if not sequential else ''}")
        if sequential:
            m, changes = fit_sequential(original, plan, calib_set, input_shapes=input_shapes, provider=provider,
                                        cache=fits)
            fit_notes = {ch.node: ch.notes for ch in changes}
        else:
            m, fit_notes = fitted.model(plan)
        value, err, per = judge_held.judge(m)
        b = bench([original, m], runs=bench_runs, warmup=3, provider=provider, threads=threads,
                  input_shapes=input_shapes, names=["original", "optimized"], progress=False)
        orig_ms = b.models[0].median_ms
        won = float(np.mean(np.asarray(b.models[0].times_ms) > np.asarray(b.models[1].times_ms)))
        p = Point(len(prefix), len(plan), orig_ms - sum(s.saving_ms for s in prefix), orig_ms,
                  b.models[1].median_ms, b.ratios[0].median, value, err, judge_held.passes(value, held_budget), won,
                  fit="sequence" if sequential else "alone")
        points.append(p)
        built.append((p, list(prefix), m, fit_notes, per))
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
    refitted = []
    if refit:
        # The search judged every conv fitted alone, on the original's statistics. The prefix it would
        # return and the shortest longer one that failed (which the refit may bring within the budget) are
        # refitted in sequence: each conv on the activations of the model rewritten so far, against the
        # original's outputs, so that later convs make up for earlier ones' errors.
        pick = _pick(passing)
        failed = [b for b in built if not b[0].passed and (pick is None or b[0].steps > pick[0].steps)]
        for b in ([pick] if pick else []) + ([min(failed, key=lambda b: b[0].steps)] if failed else []):
            if out_of_time():
                break
            evaluate(b[1], sequential=True)
            refitted.append(len(b[1]))
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
    if held_budget != budget:
        notes.append(f"the held-out samples were split off the calibration set, which flatters the fits: the search "
                     f"held {metric} ≥ {held_budget:.6g} on them (the budget {budget:g} with its allowed error divided "
                     f"by {SPLIT_MARGIN:g}; on YOLOv8n split-off crops judged 0.9909 where other photos gave 0.972)")
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
        best, prefix, final, fit_notes, per = _pick(faster)
        plan = plan_of(prefix)
        value, measured, speedup, predicted = best.metric, best.measured_ms, best.speedup, best.predicted_ms
        baseline_ms = best.original_ms  # the chosen model's ms and speed-up come from one interleaved run
    else:
        final, fit_notes, plan = original, {}, {}
        value, _, per = judge_held.judge(original)
        measured, speedup, predicted = baseline_ms, 1.0, baseline_ms
        if not passing:
            notes.append("no rewrite kept the held-out metric within the budget: the model is returned unchanged"
                         if points else "no prefix was built: the model is returned unchanged" if steps else
                         "no candidate rewrite saves measured time")
    if refitted:
        notes.append(f"refitted in sequence (each conv on the activations of the model rewritten so far): the "
                     f"prefix(es) of {', '.join(map(str, refitted))} steps")
    if backed_off:
        notes.append("backed off (each turned a passing prefix into a failing one): " + ", ".join(
            f"{b.node} {b.rule} {','.join(f'{k}={v}' for k, v in b.params.items())}" for b in backed_off))
    by_cand = {candidate_key(c.node, c.rule, c.params): c for c in cands}
    chosen = []
    for node, (rule, params) in plan.items():
        c = by_cand[candidate_key(node, rule, params)]
        chosen.append(Choice(node, rule, dict(params), c.kind_after, c.saving_ms, c.error, fit_notes.get(node, ""),
                             c.faster_share, c.estimated))
    seconds["total"] = time.perf_counter() - t_start
    report = OptimizeReport(
        model=label, metric=metric, budget=budget, rules=list(rules), provider=provider, threads=threads,
        calibration=calib_set.describe, heldout=held_set.describe, judged=list(judge_held.names),
        baseline_ms=baseline_ms, predicted_ms=predicted,
        measured_ms=measured, speedup=speedup, metric_value=value, passed=bool(chosen),
        chosen=chosen, candidates=list(cands), sequence=steps, points=sorted(points, key=lambda p: p.steps),
        outputs=per, seconds=seconds, notes=notes, quantile=quantile, timed_out=timed_out,
        coverage=None if covered is None else covered[0], held_budget=held_budget,
        excluded={n: [{"sample": s_, "why": w} for s_, w in out] for n, out in judge_held.excluded.items()})
    return restore_names(final, renamed), report
