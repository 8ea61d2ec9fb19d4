"""Error-budgeted optimization: choose, per conv, the rewrite that buys the most measured speed for the least
model-level error, fit it on calibration data, and prove the result on held-out inputs.

0. **Exact folds.** The pre-pass rules among the given ones (``fuse-hardswish``, ``fold-bn``, ``softmax-conv``,
   ``split-conv``) rewrite every conv they match first; the search starts from that model, every result is judged
   and timed against the given one.
1. **Candidates.** Every selected conv × every given rule that matches it × each rank (``ranks``) or the
   rule's defaults, keeping those that cut MACs, and int8 (the conv with its activation; :mod:`.int8`).
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
   in 3 (its int8 steps quantized together, with the ops between them) and judged on the held-out inputs;
   the longest prefix within the budget is found by bisection, and a step that alone turns a passing prefix
   into a failing one is backed off and the search goes on past it (:func:`search`). Every evaluated prefix
   is also timed: the measured error–latency front.
6. **Sequential refit** (``refit``). The prefix to return, and the next longer one, are rebuilt conv by conv in
   topological order, each fitted on the activations of the model rewritten so far against the original's
   outputs (cross moments), so that later convs make up for earlier ones' errors; judged and timed again.

The package's modules, bottom-up: ``report`` (tunables and the data the optimizer returns), ``deadline`` (one
time budget for the whole call), ``judge`` (the model-level metric), ``timing`` (1–2: the candidates and their
one-layer latencies), ``fitting`` (3: the replacements, fitted once and spliced in), ``estimate`` (3: their
errors), ``greedy`` (4, and the prefix search of 5), ``sequential`` (6), ``samples`` (what a calibration and
held-out set risk), ``phases`` (the steps above as functions over one :class:`~.phases.Plan`), ``plot``;
:func:`optimize` runs the phases.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from ..engine.rewrite import Selection
from .deadline import Deadline
from .estimate import LAYER_ERROR_BYTES, layer_errors, scale_errors
from .fitting import FIT_CHUNK, Fitted, candidate_key, fit_all, place_replacement, replacement, splice
from .greedy import greedy_sequence, needs_shorter, plan_of, search
from .judge import Judge
from .phases import (
    ERRORS_SHARE, TIMING_SHARE, Built, Plan, Settings, baseline, calibrate_candidates, finish, fit_candidates,
    judge_candidates, search_prefixes, setup, time_candidates,
)
from .plot import check_plot_path, plot_pareto
from .report import (
    DEFAULT_RANKS, DEFAULT_RULES, ERROR_FLOOR, LAYER_RANK_SHARES, MAX_MAC_RATIO, METRICS, PREDICTION_SLACK, SPEED_NOISE,
    STABLE_SHARE, Candidate, Choice, OptimizeReport, Point, Step,
)
from .samples import FEW_CALIBRATION, FEW_HELDOUT
from .sequential import FIT_CACHE_BYTES, fit_sequential
from .timing import TimingCache, candidates

__all__ = [
    "DEFAULT_RANKS", "DEFAULT_RULES", "ERROR_FLOOR", "ERRORS_SHARE", "FEW_CALIBRATION", "FEW_HELDOUT", "FIT_CACHE_BYTES",
    "FIT_CHUNK", "LAYER_ERROR_BYTES", "LAYER_RANK_SHARES", "MAX_MAC_RATIO", "METRICS", "PREDICTION_SLACK",
    "SPEED_NOISE", "STABLE_SHARE", "TIMING_SHARE", "Built", "Candidate", "Choice", "Deadline", "Fitted", "Judge",
    "OptimizeReport", "Plan", "Point", "Settings", "Step", "TimingCache", "baseline", "calibrate_candidates",
    "candidate_key", "candidates", "check_plot_path", "finish", "fit_all", "fit_candidates", "fit_sequential",
    "greedy_sequence", "judge_candidates", "layer_errors", "needs_shorter", "optimize", "place_replacement",
    "plan_of", "plot_pareto", "replacement", "scale_errors", "search", "search_prefixes", "setup", "splice",
    "time_candidates",
]


def optimize(model, calib, heldout=None, *, budget: float = 0.99, metric: str = "cosine",
             rules: Sequence[str] = DEFAULT_RULES, ranks: Sequence[int] = DEFAULT_RANKS,
             shares: Sequence[str] | None = None, selection: Selection | None = None, provider: str = "cpu",
             threads: int | None = 1, input_shapes: Mapping[str, Sequence[int]] | None = None,
             input_options: Mapping[str, Any] | None = None, tensors: Sequence[str] | None = None,
             measured: Sequence[Candidate] | None = None, probe: int = 8, layer_runs: int = 30, bench_runs: int = 20,
             max_evals: int = 12, quantile: float | None = None, time_budget: float | None = None,
             timing_cache: "TimingCache | str | os.PathLike | None" = None, refit: bool = False,
             estimate_errors: bool = True, progress=None) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Rewrite the convs of ``model`` for the most measured speed within ``budget`` on held-out inputs.

    ``calib``/``heldout``: what :func:`convgraph.run.inputs.make_inputs` takes (an image folder, an ``.npz``, a
    list of feeds, an InputSet), with ``input_options`` (image_size, mean, std, layout, samples); without
    ``heldout`` every fourth calibration sample is held out. ``budget``: the least allowed value of
    ``metric`` (cosine, SNR in dB, or top-1 agreement) on the held-out set, over the model outputs or the
    given ``tensors`` (the worst counts, part by part: :mod:`convgraph.run.metrics`).
    ``threads``: onnxruntime intra-op threads of every latency measured (None: its default); the runs
    that only compute (calibration, judging errors) use onnxruntime's default, every core. ``probe``:
    calibration samples kept out of the candidates' fits to measure their errors on (the final fits use
    all). ``measured``: the candidates of an earlier run (``report.candidates``) on the same model, data,
    rules and metric, to try another budget without measuring them again. ``shares``: the ranks tried for
    the rules whose rank spans the whole layer (``low-rank``), as shares of the full rank (default
    :data:`LAYER_RANK_SHARES`); ``ranks`` are the others'. ``time_budget``: seconds the whole call may take,
    every phase included (:class:`Deadline`); when they run out the best verified result so far is returned,
    and a note says in which phase time ran out and what it was spent on. ``timing_cache``: a
    :class:`TimingCache` (or its file) keeping one-layer timings across runs. The budget holds per held-out
    sample: on the worst one, or with ``quantile`` q on a share q of them (:class:`Judge`; samples whose
    reference is degenerate are left out and named in the report). ``max_evals``: prefixes built and judged
    in the search, each conv fitted alone on the original's statistics; with ``refit`` the one returned and
    the next longer one are then refitted in sequence (:func:`fit_sequential`). ``estimate_errors``: judge two
    candidates per conv in the whole model and scale the others' errors from their layer errors (else judge
    every one). ``progress``: a callable taking one-line status messages (stage, count, time left). Returns
    the optimized model (the original when no faster model fits the budget; ``report.passed`` then False),
    without the replaced convs' weights and with the rewrite record ``verify --localize`` reads, and the
    report.
    """
    deadline = Deadline(time_budget)
    settings = Settings(budget, metric, tuple(rules), tuple(ranks), tuple(shares) if shares else None,
                        selection or Selection(), provider, threads, input_shapes, dict(input_options or {}),
                        tuple(tensors) if tensors else None, probe, layer_runs, bench_runs, max_evals, quantile,
                        refit, estimate_errors)
    say = progress or (lambda *_: None)
    cache = timing_cache if isinstance(timing_cache, TimingCache) or timing_cache is None else \
        TimingCache(timing_cache)
    plan = setup(model, calib, heldout, settings, deadline)
    baseline(plan, settings, deadline)
    time_candidates(plan, settings, deadline, say, cache, measured)
    calibrate_candidates(plan, settings, deadline, say)
    if measured is None:
        fit_candidates(plan, deadline, say)
        judge_candidates(plan, settings, deadline, say)
    search_prefixes(plan, settings, deadline, say)
    return finish(plan, settings, deadline)
