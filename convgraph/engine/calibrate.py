"""Gathering calibration statistics (:mod:`convgraph.fit.calibration`) by running the model over calibration data."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import onnx

from ..errors import UsageError
from ..fit.calibration import FULL_MAX, FULL_POSITIONS, Calibration, ConvStats
from ..progress import track
from ..model.record import ConvRecord


# ---- running a model over calibration data ------------------------------------------------------------
def calibratable(rec: ConvRecord) -> str | None:
    """None when ``rec``'s input patches can be collected, else why not."""
    if rec.graph:
        return "inside a subgraph"
    if rec.op_type != "Conv" or rec.domain not in ("", "ai.onnx"):
        return f"{rec.op_type} is not a float Conv"
    if rec.in_channels is None or not rec.kernel or any(k is None for k in rec.kernel):
        return "unknown channels or kernel"
    return None


def _feeds(model: onnx.ModelProto, inputs, input_shapes, samples: int | None, seed: int,
           options: Mapping[str, Any]) -> Iterable[dict[str, np.ndarray]]:
    """Feed dicts, one batch each: an iterator as it is (consumed once); anything else through
    :func:`convgraph.run.inputs.make_inputs` (an ``.npz`` path, an image folder, arrays, a list of feeds)."""
    if isinstance(inputs, Iterator):
        return inputs
    from ..run.inputs import make_inputs

    return make_inputs(model, inputs, samples=samples, seed=seed, input_shapes=input_shapes, **options)


def calibrate(model, inputs, *, nodes: Iterable[str] | None = None, reference=None,
              targets: Mapping[str, str] | None = None, full_max: int = FULL_MAX, input_shapes=None,
              samples: int | None = None, provider: str = "cpu", threads: int | None = None, seed: int = 0,
              input_options: Mapping[str, Any] | None = None, holdout: bool = True, activations: bool = True,
              progress: bool = True) -> Calibration:
    """Run ``model`` over ``inputs`` and return the input-patch statistics of its convs.

    ``inputs``: an iterator of feed dicts (one batch each, consumed once), or what
    :func:`convgraph.run.inputs.make_inputs` takes (an ``.npz`` path, an image folder, a dict of arrays, a
    list of feeds, an InputSet: all lazy), with ``input_options`` (``image_size``, ``mean``, ``std``,
    ``layout``) for image folders and ``samples`` capping how many are used. ``nodes``: the conv node ids
    to collect (default: every float Conv of the main graph).
    ``reference``: a model with the same inputs whose tensors of the same names give cross moments
    (see the module doc); ``targets``: node id → tensor of ``reference`` to correlate with each conv's
    patches (needs ``reference``). ``holdout``: also keep every other batch's sums apart, so that fits
    can choose between methods by their error on data they were not fitted on. ``activations``: for a
    conv that feeds an activation (:func:`convgraph.fit.activation.activation_of`), also sum its slope
    Σ (a σ'(t))² per output channel, read on the reference's t where there is one (the weights of an
    activation-aware fit). ``progress``: report the batches as the stage "calibrating"
    (:mod:`convgraph.progress`).
    """
    from ..analysis.analyze import analyze
    from ..fit.activation import activation_of
    from ..model.graph import ConvGraph
    from ..model.loader import load
    from ..run.runtime import create_session, expose_tensors

    values = (input_options or {}).get("values")  # --input-value: the Ifs they decide, as the analysis has them
    cg = model if isinstance(model, ConvGraph) else load(model, input_shapes, check=False, input_values=values)
    proto = cg.to_model()
    recs = {r.node_id: r for r in analyze(cg, rewrites=False).convs}
    wanted = list(nodes) if nodes is not None else [n for n, r in recs.items() if calibratable(r) is None]
    stats = Calibration(info={"full_max": full_max, "full_positions": FULL_POSITIONS, "reference": reference is not None})
    for n in wanted:
        rec = recs.get(n)
        if rec is None:
            raise UsageError(f"no conv {n!r} in the model")
        why = calibratable(rec)
        if why:
            raise UsageError(f"conv {n!r} cannot be calibrated: {why}")
        tgt = (targets or {}).get(n)
        if tgt is not None and reference is None:
            raise UsageError("targets need a reference model")
        stats[n] = ConvStats.for_record(rec, full_max, reference is not None, tgt, holdout)
    if not stats:
        return stats
    acts = {n: a for n in stats if activations and (a := activation_of(cg, n)) is not None}
    ref_cg = None
    if reference is not None:
        ref_cg = reference if isinstance(reference, ConvGraph) else load(reference, input_shapes, check=False,
                                                                           input_values=values)
    act_ref = {n for n, a in acts.items() if ref_cg is not None and ref_cg.producer(a.tensor) is not None}
    for n, a in acts.items():
        for s in (stats[n], stats[n].holdout):
            if s is not None:
                s.activation = a.describe
    names = sorted({s.input for s in stats.values()} | {a.tensor for n, a in acts.items() if n not in act_ref})
    sess = create_session(expose_tensors(proto, names, cg.shapes), provider=provider, threads=threads)
    ref_sess, ref_names = None, []
    if ref_cg is not None:
        wanted_ref = {s.input for s in stats.values()} | {s.target for s in stats.values() if s.target}
        missing = sorted(t for t in wanted_ref if ref_cg.producer(t) is None)
        if missing:
            raise UsageError(f"the reference model has no tensor {missing[0]!r}")
        ref_names = sorted(wanted_ref | {acts[n].tensor for n in act_ref})
        ref_sess = create_session(expose_tensors(ref_cg.to_model(), ref_names, ref_cg.shapes), provider=provider,
                                  threads=threads)
    batches = 0
    feeds = _feeds(proto, inputs, input_shapes, samples, seed, input_options or {})
    for feed in track(feeds, "calibrating") if progress else feeds:
        got = _run(sess, feed, names)
        ref = _run(ref_sess, feed, ref_names) if ref_sess is not None else {}
        for n, s in stats.items():
            a = acts.get(n)
            act_sq = None if a is None else a.weight_sums((ref if n in act_ref else got)[a.tensor])
            s.update(got[s.input], ref.get(s.input), ref.get(s.target) if s.target else None, act_sq)
        del got, ref
        batches += 1
    if batches == 0:
        raise UsageError("the calibration set is empty")
    stats.info["batches"] = batches
    return stats


def _run(sess, feed: dict, names: list[str]) -> dict[str, np.ndarray]:
    from ..run.runtime import run

    return dict(zip(names, run(sess, feed, names)))
