"""Numerical verification of a candidate model against a reference with onnxruntime.

Per output, over all samples: max/mean abs error, max relative error, cosine similarity, SNR, top-k
agreement for class scores, and the smallest atol/rtol that would have passed. An element fails only
when its abs error exceeds atol AND its relative error exceeds rtol (polygraphy's rule); NaN always
fails. Everything is computed in float64. ``localize=True`` compares the intermediate tensors the two
models share and names the first candidate node whose output leaves tolerance (:mod:`convgraph.engine.localize`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from ..run import runtime
from ..errors import ModelError, UsageError
from ..model.graph import ConvGraph
from ..model.loader import load
from ..run.inputs import InputSpec, make_inputs, input_specs
from ..run.metrics import Accumulator, Metrics, Tolerance
from .localize import Localization, first_divergence
from ..progress import track
from ..model.record import REWRITES_KEY


# ---- report ---------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """Outcome of :func:`verify`; ``passed`` is the verdict, ``verdict`` says why not."""

    passed: bool
    outputs: dict[str, Metrics]
    tolerance: Tolerance
    samples: int
    inputs: str
    provider: str
    first_divergent_node: str | None = None
    first_divergent_origin: str | None = None
    localization: Localization | None = None
    reference_evaluator: dict | None = None  # {"reference": {out: Metrics}, "candidate": {...}, "passed": bool}
    warnings: list[str] = field(default_factory=list)
    sample_names: list[str] = field(default_factory=list)  # what to call each sample (image files, else index)
    tensors: list[str] | None = None  # the tensors judged instead of the outputs (``--tensor``)
    #: tensors judged beside the outputs: what they add a constant grid to (:mod:`convgraph.run.offsets`)
    judged_beside: list[str] = field(default_factory=list)
    tolerance_basis: str | None = None  # why atol/rtol are not float32's defaults (narrower float outputs)

    def sample_name(self, i: int | None) -> str:
        return "?" if i is None else self.sample_names[i] if i < len(self.sample_names) else f"sample {i}"

    def failing(self, m: Metrics) -> list[str]:
        """The samples on which ``m``'s tensor is out of tolerance, by name."""
        return [self.sample_name(i) for i in m.failed_samples]

    @property
    def verdict(self) -> str:
        """``passed``; ``failed`` when a difference was seen; ``inconclusive`` when an output's reference
        says nothing on every sample (so no difference could be seen there) and nothing failed."""
        if self.passed:
            return "passed"
        ev = (self.reference_evaluator or {}).get("candidate", {})
        seen = [m for m in [*self.outputs.values(), *ev.values()] if not m.passed and not m.inconclusive]
        return "failed" if seen else "inconclusive"

    def failures(self) -> list[str]:
        """Names of the outputs out of tolerance (against onnxruntime, then the evaluator)."""
        bad = [n for n, m in self.outputs.items() if not m.passed]
        if self.reference_evaluator:
            bad += [f"{n} (vs onnx.reference)" for n, m in self.reference_evaluator["candidate"].items() if not m.passed]
        return bad

    def summary(self) -> str:
        """One line: the verdict, the worst output, the first divergent node."""
        n_s = f"{self.samples} sample{'s' * (self.samples != 1)}"
        if self.passed:
            text = f"within tolerance ({self.tolerance.describe()}) on {n_s}"
            skipped = {n: m for n, m in self.outputs.items() if m.degenerate_samples and not m.inconclusive}
            if skipped:
                text += "; " + ", ".join(f"{n}: {len(m.degenerate_samples)} sample(s) uninformative, not judged"
                                        for n, m in skipped.items())
            return text
        if self.verdict == "inconclusive":
            dead = [f"{n} ({m.degenerate_reason})" for n, m in self.outputs.items() if m.inconclusive]
            return (f"inconclusive: the reference's output{'s' * (len(dead) > 1)} {'; '.join(dead)} on every one of the "
                    f"{n_s} ({self.inputs}), so no difference could show; pass inputs like the model's real data "
                    f"(--inputs DIR|FILE.npz with --image-size/--mean/--std)")
        parts = []
        for n, m in self.outputs.items():
            if not m.passed and not m.inconclusive:
                parts.append(f"{n} ({m.error or self._failure(m)})")
        if self.reference_evaluator:
            parts += [f"{n} vs onnx.reference (max abs err {m.max_abs_err:.3g})"
                      for n, m in self.reference_evaluator["candidate"].items() if not m.passed and not m.inconclusive]
        text = f"outside tolerance ({self.tolerance.describe()}): {'; '.join(parts)}"
        if self.first_divergent_node:
            text += f"; first divergent node: {self.first_divergent_node}"
            if self.first_divergent_origin:
                text += f" (replacing {self.first_divergent_origin})"
            shown = self.localization.shown_at_node if self.localization else None
            if shown:
                text += f", first out of tolerance at the output of {shown}"
        return text

    def _failure(self, m: Metrics) -> str:
        """What failed in ``m``: the part that decided, the worst sample, the failing samples by name."""
        where = f" in part {m.decided_by}" if m.decided_by else ""
        worst = f" on {self.sample_name(m.worst_sample)}" if m.worst_sample is not None and m.samples > 1 else ""
        bad = self.failing(m)
        named = (f"; failing: {', '.join(bad[:5])}{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}"
                 if bad and m.samples > 1 else "")
        out = f", {m.mismatches} of {m.elements} elements out" if self.tolerance.elementwise else ""
        text = (f"cosine {m.cosine:.6g}{where}{worst}, max abs err {m.max_abs_err:.3g}{out}"
                if m.cosine == m.cosine else f"max abs err {m.max_abs_err:.3g}{out}")
        return text + (f", {m.nan} NaN" if m.nan else "") + named

    def to_dict(self) -> dict:
        ev = None
        if self.reference_evaluator is not None:
            ev = {"passed": self.reference_evaluator["passed"],
                  **{k: {n: m.to_dict() for n, m in self.reference_evaluator[k].items()} for k in ("reference", "candidate")}}
        outputs = {n: {**m.to_dict(), "failing_samples": self.failing(m),
                       "worst_sample_name": None if m.worst_sample is None else self.sample_name(m.worst_sample)}
                   for n, m in self.outputs.items()}
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "outputs": outputs,
            "tensors": self.tensors,
            "judged_beside": list(self.judged_beside),
            "tolerance_basis": self.tolerance_basis,
            "sample_names": list(self.sample_names),
            "first_divergent_node": self.first_divergent_node,
            "first_divergent_origin": self.first_divergent_origin,
            "localization": self.localization.to_dict() if self.localization else None,
            "reference_evaluator": ev,
            "tolerance": asdict(self.tolerance),
            "samples": self.samples,
            "inputs": self.inputs,
            "provider": self.provider,
            "warnings": list(self.warnings),
        }


# ---- models ---------------------------------------------------------------------------------------
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _type_name(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t).lower() if t else "?"


def _dims(shape) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def check_compatible(ref: ConvGraph, cand: ConvGraph) -> None:
    """Same input and output names, element types (float widths may differ) and static dims; else ModelError."""
    for kind in ("input", "output"):
        ref_t, cand_t = _io(ref, kind), _io(cand, kind)
        if set(ref_t) != set(cand_t):
            raise ModelError(f"the models have different {kind}s: reference {', '.join(ref_t) or 'none'}; "
                             f"candidate {', '.join(cand_t) or 'none'}")
        for name in ref_t:
            a, b = ref.shapes.get(name), cand.shapes.get(name)
            if a is None or b is None:
                continue
            if a.elem_type != b.elem_type and not (a.elem_type in _FLOATS and b.elem_type in _FLOATS) and a.elem_type and b.elem_type:
                raise ModelError(f"{kind} {name!r} is {_type_name(a.elem_type)} in the reference, "
                                 f"{_type_name(b.elem_type)} in the candidate")
            if a.shape is not None and b.shape is not None and (
                    len(a.shape) != len(b.shape)
                    or any(isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y for x, y in zip(a.shape, b.shape))):
                raise ModelError(f"{kind} {name!r} has shape {_dims(a.shape)} in the reference, {_dims(b.shape)} in the candidate")


def _check_specs(ref: dict[str, InputSpec], cand: dict[str, InputSpec]) -> None:
    """The inputs as declared: same names, compatible types, equal static dims (before any shape is fixed)."""
    if set(ref) != set(cand):
        raise ModelError(f"the models have different inputs: reference {', '.join(ref) or 'none'}; "
                         f"candidate {', '.join(cand) or 'none'}")
    for name, a in ref.items():
        b = cand[name]
        if a.elem_type != b.elem_type and not (a.elem_type in _FLOATS and b.elem_type in _FLOATS):
            raise ModelError(f"input {name!r} is {_type_name(a.elem_type)} in the reference, {_type_name(b.elem_type)} in the candidate")
        if a.shape is not None and b.shape is not None and (len(a.shape) != len(b.shape) or any(
                isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y for x, y in zip(a.shape, b.shape))):
            raise ModelError(f"input {name!r} has shape {_dims(a.shape)} in the reference, {_dims(b.shape)} in the candidate")


def _io(cg: ConvGraph, kind: str) -> list[str]:
    g = cg.model.graph
    if kind == "output":
        return [o.name for o in g.output]
    inits = {t.name for t in g.initializer}
    return [i.name for i in g.input if i.name not in inits]


def rewrite_record(model: onnx.ModelProto) -> dict | None:
    """The rewrite engine's record (``metadata_props["convgraph.rewrites"]``), or None."""
    for p in model.metadata_props:
        if p.key == REWRITES_KEY:
            try:
                rec = json.loads(p.value)
            except ValueError:
                warnings.warn(f"metadata {REWRITES_KEY!r} is not JSON; ignored", stacklevel=3)
                return None
            if not isinstance(rec, dict):
                return None
            rec.setdefault("rewrites", [])
            rec.setdefault("tensor_map", {})
            return rec
    return None


def _cast_feeds(sample: Mapping[str, np.ndarray], specs: dict[str, InputSpec]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sample.items():
        dt = specs[k].dtype if k in specs else v.dtype
        out[k] = v if v.dtype == dt else v.astype(dt)
    return out


# ---- the entry point ------------------------------------------------------------------------------
def verify(reference, candidate, *, inputs=None, samples: int | None = None,
           input_shapes: Mapping[str, Sequence[int]] | None = None, atol: float | None = None,
           rtol: float | None = None, min_cosine: float | None = None, localize: bool = False,
           provider: str = "cpu", reference_evaluator: bool = False, tensor_map: Mapping[str, str] | None = None,
           seed: int = 0, threads: int | None = None, opt_level: str = "all", image_size=None, mean=None, std=None,
           layout: str = "nchw", values=None, tensors: Sequence[str] | None = None) -> VerifyReport:
    """Run ``reference`` and ``candidate`` (path, bytes, ModelProto or ConvGraph) on the same inputs and
    compare their outputs.

    ``inputs``: None for ``samples`` random sets (default 1, seeded by ``seed``), an ``.npz`` path, a
    folder of images (``image_size``, ``mean``, ``std``, ``layout``), a dict of arrays or a list of dicts;
    ``values`` fixes inputs' values in every set (``--input-value``).
    Tolerance: ``atol``/``rtol`` (defaults 1e-4/1e-3) and/or ``min_cosine`` (see :class:`Tolerance`).
    ``localize``: find the first candidate node whose output leaves tolerance (tensors matched by name,
    or through ``tensor_map`` {candidate: reference}, by default the one the rewrite stored in the
    candidate's metadata). ``reference_evaluator``: also run ``onnx.reference.ReferenceEvaluator`` on
    the reference, so that an onnxruntime bug shared by both models cannot hide (small models only).
    ``tensors``: judge these tensors (any present in both models, intermediate ones included) instead of
    the outputs. Every output or tensor is judged part by part (:mod:`convgraph.run.metrics`).
    """
    tol = Tolerance.make(atol, rtol, min_cosine)
    run_opts: dict[str, Any] = {"provider": provider, "threads": threads, "opt_level": opt_level}
    runtime.providers(provider)  # a missing CUDA provider fails before any work
    ref_model, cand_model = runtime.as_model(reference), runtime.as_model(candidate)
    basis = None
    if (atol is None or rtol is None) and (min_cosine is None or atol is not None or rtol is not None):
        # unset atol/rtol follow the outputs' element type (float16's rounding is not float32's)
        from ..run import tolerance

        types = [o.type.tensor_type.elem_type for o in ref_model.graph.output]
        d_atol, d_rtol, basis = tolerance.verify_defaults(types)
        if basis is not None:
            tol = Tolerance.make(d_atol if atol is None else atol, d_rtol if rtol is None else rtol, min_cosine)
    ref_specs = {s.name: s for s in input_specs(ref_model)}
    cand_specs = {s.name: s for s in input_specs(cand_model)}
    _check_specs(ref_specs, cand_specs)
    data = make_inputs(list(ref_specs.values()), inputs, samples=samples, seed=seed, input_shapes=input_shapes,
                       image_size=image_size, mean=mean, std=std, layout=layout, values=values)
    shapes = {k: list(v) for k, v in data.shapes().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        given = dict(values) if values else None  # --input-value decides Ifs here as in analyze
        ref_cg = load(ref_model, shapes, check=False, input_values=given)
        cand_cg = load(cand_model, shapes, check=False, input_values=given)
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    check_compatible(ref_cg, cand_cg)
    out_names = _io(ref_cg, "output")
    beside: list[str] = []
    if not tensors:  # what the outputs add a constant grid to is judged beside them (convgraph.run.offsets)
        from ..run.offsets import offset_roots

        roots, have = offset_roots(ref_model), produced(cand_model)
        beside = [t for t in roots if t in have]
        if len(beside) < len(roots):
            notes.append(f"not judged: {', '.join(t for t in roots if t not in have)} (what the reference's outputs "
                         "add constants to) is not in the candidate; the outputs' cosine may hide their errors "
                         "(--tensor names what to judge)")
    if tensors or beside:
        out_names = list(dict.fromkeys(tensors or [*out_names, *beside]))
        for which, model in (("reference", ref_model), ("candidate", cand_model)):
            have = produced(model)
            missing = [t for t in out_names if t not in have]
            if missing:
                raise UsageError(f"--tensor {missing[0]!r}: no such tensor in the {which} model")
        ref_model = runtime.expose_tensors(ref_model, out_names, ref_cg.shapes)
        cand_model = runtime.expose_tensors(cand_model, out_names, cand_cg.shapes)

    rs, cs = runtime.create_session(ref_model, **run_opts), runtime.create_session(cand_model, **run_opts)
    evaluator = _evaluator(ref_model) if reference_evaluator else None
    accs = {n: Accumulator(n, tol) for n in out_names}
    ev_accs = {k: {n: Accumulator(n, tol) for n in out_names} for k in ("reference", "candidate")} if evaluator else None
    for i in track(range(len(data)), "comparing outputs"):
        sample = data[i]
        ref_out = dict(zip(out_names, runtime.run(rs, _cast_feeds(sample, ref_specs), out_names)))
        cand_out = dict(zip(out_names, runtime.run(cs, _cast_feeds(sample, cand_specs), out_names)))
        for n in out_names:
            accs[n].update(ref_out[n], cand_out[n])
        if evaluator is not None and ev_accs is not None:
            ev_out = _evaluate(evaluator, _cast_feeds(sample, ref_specs), out_names)
            for n in out_names:
                ev_accs["reference"][n].update(ev_out[n], ref_out[n])
                ev_accs["candidate"][n].update(ev_out[n], cand_out[n])
    del rs, cs
    outputs = {n: a.result() for n, a in accs.items()}
    ev: dict[str, Any] | None = None
    if ev_accs is not None:
        ev = {k: {n: a.result() for n, a in v.items()} for k, v in ev_accs.items()}
        ev["passed"] = all(m.passed for m in ev["candidate"].values())
    passed = all(m.passed for m in outputs.values()) and (ev is None or ev["passed"])
    report = VerifyReport(passed=passed, outputs=outputs, tolerance=tol, tolerance_basis=basis, samples=len(data),
                          inputs=data.describe,
                          provider=provider, reference_evaluator=ev, warnings=notes, sample_names=data.names,
                          tensors=list(out_names) if tensors else None, judged_beside=beside)
    failed = sorted({i for m in [*outputs.values(), *((ev or {}).get("candidate") or {}).values()]
                     for i in m.failed_samples})
    first_bad = failed[0] if failed else None
    if localize:
        record = rewrite_record(cand_model)
        tmap = dict(tensor_map) if tensor_map is not None else dict((record or {}).get("tensor_map") or {})
        k = first_bad if first_bad is not None else 0
        sample = data[k]
        loc = first_divergence(ref_model, cand_model, ref_cg, cand_cg, _cast_feeds(sample, ref_specs),
                               _cast_feeds(sample, cand_specs), k, tol, tmap, record, run_opts)
        report.localization = loc
        report.first_divergent_node, report.first_divergent_origin = loc.first_divergent_node, loc.first_divergent_origin
        if not passed and loc.first_divergent_node is None:
            report.warnings.append(f"no shared intermediate tensor left tolerance on sample {k}; the outputs "
                                   f"diverge through tensors only the candidate has")
    return report


def produced(model: onnx.ModelProto) -> set[str]:
    """The main graph's tensors: its inputs, initializers and node outputs."""
    g = model.graph
    return {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}


def _evaluator(model: onnx.ModelProto):
    from onnx.reference import ReferenceEvaluator

    try:
        return ReferenceEvaluator(model)
    except Exception as e:  # noqa: BLE001 - any failure of the third-party evaluator becomes one line
        raise ModelError(f"onnx.reference.ReferenceEvaluator cannot load the reference model: {e}") from None


def _evaluate(evaluator, feeds, out_names) -> dict[str, np.ndarray]:
    try:
        return dict(zip(out_names, evaluator.run(out_names, feeds)))
    except Exception as e:  # noqa: BLE001 - idem
        raise ModelError(f"onnx.reference.ReferenceEvaluator failed on the reference model: {e}") from None
