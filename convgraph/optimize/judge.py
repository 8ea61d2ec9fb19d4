"""The model-level error of a rewritten model on held-out inputs (cosine, SNR or top-1 agreement)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx

from ..engine.verify import produced
from ..errors import UsageError
from .report import METRICS


# ---- metrics ----------------------------------------------------------------------------------------------
class Judge:
    """The original model's outputs (or other ``tensors``) on a fixed input set, and the metric of a
    candidate against them, **per sample**: per tensor the worst informative sample (or, with ``quantile``
    q, the value that a share q of them reach), and the worst tensor counts. A sample whose reference is
    degenerate for the metric (:func:`convgraph.run.metrics.degenerate`: every value tiny, constant or
    saturated; PP-OCR det's text map on a picture without text) is left out of that tensor's figures and
    named in :attr:`excluded`; with ``strict`` a tensor with no informative sample is an error, else it
    is judged on all samples pooled. ``names``: what to call the samples (default: their index)."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[dict], metric: str, provider: str,
                 threads: int | None, tensors: Sequence[str] | None = None, *, quantile: float | None = None,
                 names: Sequence[str] | None = None, strict: bool = True):
        from ..run.metrics import degenerate

        if metric not in METRICS:
            raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
        if quantile is not None and not 0.0 < quantile <= 1.0:
            raise UsageError(f"--quantile is the share of held-out samples the budget must hold on, in (0, 1]; "
                             f"got {quantile}")
        self.feeds, self.metric, self.provider, self.threads = list(feeds), metric, provider, threads
        self.quantile = quantile
        if not self.feeds:
            raise UsageError("the held-out set is empty")
        self.sample_names = list(names) if names is not None else [f"sample {i}" for i in range(len(self.feeds))]
        self.names = list(tensors) if tensors else [o.name for o in model.graph.output]
        have = produced(model)
        missing = [t for t in self.names if t not in have]
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
        from ..run.runtime import create_session, expose_tensors, run

        sess = create_session(expose_tensors(model, self.names), provider=self.provider, threads=self.threads)
        outs: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        for f in self.feeds:
            for n, v in zip(self.names, run(sess, f, self.names)):
                outs[n].append(v)
        return outs

    def _value(self, m, snr: bool = False) -> float:
        """A tensor's :class:`~convgraph.run.metrics.Metrics` → the figure the budget is held on: the worst
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
        from ..run.metrics import compare, weak_notes

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
            d["decided_by"] = m.decided_by
            d["weak"] = next(iter(weak_notes([m], self.sample_names)), None)
            d["part_distribution"] = [
                {"part": p.name, "min": p.cosine if p.worst_sample is not None else None,
                 "worst_sample": self.sample_names[p.worst_sample] if p.worst_sample is not None else None,
                 "silent": p.degenerate_reason if p.worst_sample is None else None} for p in m.parts]
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
