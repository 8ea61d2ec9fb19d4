"""Each candidate's error: its layer error (its replacement run alone on the conv's real inputs), and the
model-level error of two candidates per conv judged in the whole model, the others' scaled from their
layer errors along the power law through those two."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .fitting import Fitted
from .judge import Judge
from .report import Candidate


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
        b = 4 * len(judge.feeds) * (math.prod(rec.input_shape or ()) + math.prod(rec.output_shape or ()))
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
            opts = sorted(by_node[rec.node_id], key=_layer_error)
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
        # (layer error, judged error, candidate) of the judged ones
        ref = [(_layer_error(c), c.error, c) for c in opts
               if c.error is not None and math.isfinite(c.error) and _layer_error(c) > 0]
        if not ref:
            continue
        lo, hi = min(ref, key=lambda r: r[0]), max(ref, key=lambda r: r[0])
        p = 1.0
        if hi[0] > lo[0] and lo[1] > 0 and hi[1] > 0:
            p = min(max(math.log(hi[1] / lo[1]) / math.log(hi[0] / lo[0]), 0.5), 2.0)
        for c in opts:
            le = _layer_error(c)
            if c.error is None and math.isfinite(le):
                near = lo if abs(math.log(max(le, 1e-30) / lo[0])) <= abs(math.log(max(le, 1e-30) / hi[0])) else hi
                c.error = near[1] * (le / near[0]) ** p if le > 0 else 0.0
                c.estimated = True


def _layer_error(c: Candidate) -> float:
    return math.inf if c.layer_error is None else c.layer_error
