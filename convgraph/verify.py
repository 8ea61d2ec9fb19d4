"""Numerical verification of a candidate model against a reference with onnxruntime.

Per output, over all samples: max/mean abs error, max relative error, cosine similarity, SNR, top-k
agreement for class scores, and the smallest atol/rtol that would have passed. An element fails only
when its abs error exceeds atol AND its relative error exceeds rtol (polygraphy's rule); NaN always
fails. Everything is computed in float64. ``localize=True`` compares the intermediate tensors the two
models share and names the first candidate node whose output leaves tolerance.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import runtime
from .errors import ModelError, UsageError
from .graph import ConvGraph, load
from .inputs import InputSpec, make_inputs, input_specs
from .metrics import DEFAULT_ATOL, DEFAULT_RTOL, Accumulator, Metrics, Tolerance, compare  # noqa: F401 - re-exported

#: Metadata key (in the rewritten model's ``metadata_props``) holding the rewrite engine's record.
REWRITES_KEY = "convgraph.rewrites"
#: Localization exposes intermediates in chunks of at most this many bytes per model and run.
LOCALIZE_CHUNK_BYTES = 512 * 2**20


# ---- report ---------------------------------------------------------------------------------------
@dataclass
class Localization:
    """Where the candidate starts to differ (one sample, shared intermediate tensors)."""

    sample: int
    compared: int  # shared intermediate tensors compared
    shared: int  # intermediate tensors of the candidate with a counterpart in the reference
    unmatched: int  # intermediate tensors only the candidate has (new tensors of a rewrite)
    first_divergent_node: str | None = None
    first_divergent_op: str | None = None
    first_divergent_tensor: str | None = None
    first_divergent_origin: str | None = None
    rewrite: dict | None = None  # the rewrite record entry that made the node, when the metadata has one
    region: list[str] = field(default_factory=list)  # candidate nodes between the inputs and the tensor
    tensor: Metrics | None = None
    inputs: list[dict] = field(default_factory=list)  # the shared tensors it reads, with their metrics
    divergent: int = 0  # tensors out of tolerance among those compared

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensor"] = self.tensor.to_dict() if self.tensor else None
        return d


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
                worst = f" (worst: sample {m.worst_sample})" if m.worst_sample is not None and m.samples > 1 else ""
                detail = m.error or (f"max abs err {m.max_abs_err:.3g}, cosine {m.cosine:.6g}{worst}, "
                                     f"{m.mismatches} of {m.elements} elements out" + (f", {m.nan} NaN" if m.nan else ""))
                parts.append(f"{n} ({detail})")
        if self.reference_evaluator:
            parts += [f"{n} vs onnx.reference (max abs err {m.max_abs_err:.3g})"
                      for n, m in self.reference_evaluator["candidate"].items() if not m.passed and not m.inconclusive]
        text = f"outside tolerance ({self.tolerance.describe()}): {'; '.join(parts)}"
        if self.first_divergent_node:
            text += f"; first divergent node: {self.first_divergent_node}"
            if self.first_divergent_origin:
                text += f" (replacing {self.first_divergent_origin})"
        return text

    def to_dict(self) -> dict:
        ev = None
        if self.reference_evaluator is not None:
            ev = {"passed": self.reference_evaluator["passed"],
                  **{k: {n: m.to_dict() for n, m in self.reference_evaluator[k].items()} for k in ("reference", "candidate")}}
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "outputs": {n: m.to_dict() for n, m in self.outputs.items()},
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


# ---- localization ---------------------------------------------------------------------------------
def _activations(cg: ConvGraph) -> dict[str, str]:
    """Tensors of the main graph that depend on a graph input (not weights), in topological order → producer."""
    G, dep, out = cg.graph, set(), {}
    for nid in cg.topological_order():
        if any(G.nodes[u]["kind"] == "input" or u in dep for u, _ in G.in_edges(nid)):
            dep.add(nid)
            for t in G.nodes[nid]["proto"].output:
                if t:
                    out[t] = nid
    return out


def _nbytes(cg: ConvGraph, t: str) -> int | None:
    info = cg.shapes.get(t)
    if info is None or not info.static or not info.elem_type:
        return None
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(info.shape) * item


def _chunks(pairs: list[tuple[str, str]], cand: ConvGraph, budget: int) -> list[list[tuple[str, str]]]:
    sizes = [_nbytes(cand, c) for c, _ in pairs]
    fallback = max([s for s in sizes if s is not None], default=0)
    chunks, cur, used = [], [], 0
    for pair, s in zip(pairs, sizes):
        s = fallback if s is None else s
        if cur and used + s > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(pair)
        used += s
    if cur:
        chunks.append(cur)
    return chunks


def _localize(ref_model, cand_model, ref_cg: ConvGraph, cand_cg: ConvGraph, ref_feeds, cand_feeds, sample: int,
              tol: Tolerance, tensor_map: Mapping[str, str], record: dict | None, run_opts: dict) -> Localization:
    ref_act, cand_act = _activations(ref_cg), _activations(cand_cg)
    pairs: list[tuple[str, str]] = []  # (candidate tensor, reference tensor) in the candidate's order
    for t in cand_act:
        r = tensor_map.get(t, t)
        if r in ref_act:
            pairs.append((t, r))
    shared = {c for c, _ in pairs}
    loc = Localization(sample=sample, compared=0, shared=len(pairs), unmatched=len(cand_act) - len(pairs))
    metrics: dict[str, Metrics] = {}
    first: str | None = None
    for chunk in _chunks(pairs, cand_cg, LOCALIZE_CHUNK_BYTES):
        ref_names, cand_names = [r for _, r in chunk], [c for c, _ in chunk]
        rs = runtime.create_session(runtime.expose_tensors(ref_model, ref_names, ref_cg.shapes), **run_opts)
        ref_vals = dict(zip(ref_names, runtime.run(rs, ref_feeds, ref_names)))
        del rs
        cs = runtime.create_session(runtime.expose_tensors(cand_model, cand_names, cand_cg.shapes), **run_opts)
        cand_vals = dict(zip(cand_names, runtime.run(cs, cand_feeds, cand_names)))
        del cs
        for c, r in chunk:
            rv, cv = ref_vals.pop(r, None), cand_vals.pop(c, None)
            if not isinstance(rv, np.ndarray) or not isinstance(cv, np.ndarray):
                continue  # sequences and maps are not compared
            acc = Accumulator(c, tol)
            acc.update(rv, cv)
            m = acc.result()
            metrics[c] = m
            loc.compared += 1
            if not m.passed:
                loc.divergent += 1
                first = first or c
        del ref_vals, cand_vals
        if first is not None:
            break
    if first is None:
        return loc
    node = cand_act[first]
    G = cand_cg.graph
    loc.first_divergent_node, loc.first_divergent_tensor = node, first
    loc.first_divergent_op = G.nodes[node]["op_type"]
    loc.tensor = metrics[first]
    # walk back through tensors only the candidate has, to the shared tensors (or graph inputs) it reads
    region, seen, frontier, stack = [node], {node}, {}, [node]
    while stack:
        for u, _, d in G.in_edges(stack.pop(), data=True):
            t, kind = d["tensor"], G.nodes[u]["kind"]
            if kind == "input":
                frontier[t] = {"tensor": t, "graph_input": True}
            elif t in shared:
                m = metrics.get(t)
                frontier[t] = {"tensor": t, "passed": m.passed if m else None,
                               "max_abs_err": m.max_abs_err if m else None, "cosine": m.cosine if m else None}
            elif kind == "op" and t in cand_act and u not in seen:
                seen.add(u)
                region.append(u)
                stack.append(u)
    order = {n: i for i, n in enumerate(cand_cg.topological_order())}
    loc.region = sorted(region, key=order.__getitem__)
    loc.inputs = list(frontier.values())
    if record:
        names = {cand_cg.node(n).name or n for n in loc.region}
        for entry in record.get("rewrites", []):
            new = set(entry.get("new_nodes", []) or [])
            if new & names or new & set(loc.region):
                loc.rewrite = entry
                old = list(entry.get("old_nodes", []) or [])
                convs = [o for o in old if o in ref_cg.graph and ref_cg.graph.nodes[o].get("op_type", "").endswith(
                    ("Conv", "ConvTranspose", "ConvInteger"))]
                loc.first_divergent_origin = (convs or old or [None])[0]
                break
    return loc


# ---- the entry point ------------------------------------------------------------------------------
def verify(reference, candidate, *, inputs=None, samples: int | None = None,
           input_shapes: Mapping[str, Sequence[int]] | None = None, atol: float | None = None,
           rtol: float | None = None, min_cosine: float | None = None, localize: bool = False,
           provider: str = "cpu", reference_evaluator: bool = False, tensor_map: Mapping[str, str] | None = None,
           seed: int = 0, threads: int | None = None, opt_level: str = "all", image_size=None, mean=None, std=None,
           layout: str = "nchw") -> VerifyReport:
    """Run ``reference`` and ``candidate`` (path, bytes, ModelProto or ConvGraph) on the same inputs and
    compare their outputs.

    ``inputs``: None for ``samples`` random sets (default 1, seeded by ``seed``), an ``.npz`` path, a
    folder of images (``image_size``, ``mean``, ``std``, ``layout``), a dict of arrays or a list of dicts.
    Tolerance: ``atol``/``rtol`` (defaults 1e-4/1e-3) and/or ``min_cosine`` (see :class:`Tolerance`).
    ``localize``: find the first candidate node whose output leaves tolerance (tensors matched by name,
    or through ``tensor_map`` {candidate: reference}, by default the one the rewrite stored in the
    candidate's metadata). ``reference_evaluator``: also run ``onnx.reference.ReferenceEvaluator`` on
    the reference, so that an onnxruntime bug shared by both models cannot hide (small models only).
    """
    tol = Tolerance.make(atol, rtol, min_cosine)
    run_opts = {"provider": provider, "threads": threads, "opt_level": opt_level}
    runtime.providers(provider)  # a missing CUDA provider fails before any work
    ref_model, cand_model = runtime.as_model(reference), runtime.as_model(candidate)
    ref_specs = {s.name: s for s in input_specs(ref_model)}
    cand_specs = {s.name: s for s in input_specs(cand_model)}
    _check_specs(ref_specs, cand_specs)
    data = make_inputs(list(ref_specs.values()), inputs, samples=samples, seed=seed, input_shapes=input_shapes,
                       image_size=image_size, mean=mean, std=std, layout=layout)
    shapes = {k: list(v) for k, v in data.shapes().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_cg, cand_cg = load(ref_model, shapes, check=False), load(cand_model, shapes, check=False)
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    check_compatible(ref_cg, cand_cg)
    out_names = _io(ref_cg, "output")

    rs, cs = runtime.create_session(ref_model, **run_opts), runtime.create_session(cand_model, **run_opts)
    evaluator = _evaluator(ref_model) if reference_evaluator else None
    accs = {n: Accumulator(n, tol) for n in out_names}
    ev_accs = {k: {n: Accumulator(n, tol) for n in out_names} for k in ("reference", "candidate")} if evaluator else None
    first_bad: int | None = None
    for i in range(len(data)):
        sample = data[i]
        ref_out = dict(zip(out_names, runtime.run(rs, _cast_feeds(sample, ref_specs), out_names)))
        cand_out = dict(zip(out_names, runtime.run(cs, _cast_feeds(sample, cand_specs), out_names)))
        ok = all([accs[n].update(ref_out[n], cand_out[n]) for n in out_names])
        if evaluator is not None:
            ev_out = _evaluate(evaluator, _cast_feeds(sample, ref_specs), out_names)
            for n in out_names:
                ev_accs["reference"][n].update(ev_out[n], ref_out[n])
                ok &= ev_accs["candidate"][n].update(ev_out[n], cand_out[n])
        if not ok and first_bad is None:
            first_bad = i
    del rs, cs
    outputs = {n: a.result() for n, a in accs.items()}
    ev = None
    if ev_accs is not None:
        ev = {k: {n: a.result() for n, a in v.items()} for k, v in ev_accs.items()}
        ev["passed"] = all(m.passed for m in ev["candidate"].values())
    passed = all(m.passed for m in outputs.values()) and (ev is None or ev["passed"])
    report = VerifyReport(passed=passed, outputs=outputs, tolerance=tol, samples=len(data), inputs=data.describe,
                          provider=provider, reference_evaluator=ev, warnings=notes)
    if localize:
        record = rewrite_record(cand_model)
        tmap = dict(tensor_map) if tensor_map is not None else dict((record or {}).get("tensor_map") or {})
        k = first_bad if first_bad is not None else 0
        sample = data[k]
        loc = _localize(ref_model, cand_model, ref_cg, cand_cg, _cast_feeds(sample, ref_specs),
                        _cast_feeds(sample, cand_specs), k, tol, tmap, record, run_opts)
        report.localization = loc
        report.first_divergent_node, report.first_divergent_origin = loc.first_divergent_node, loc.first_divergent_origin
        if not passed and loc.first_divergent_node is None:
            report.warnings.append(f"no shared intermediate tensor left tolerance on sample {k}; the outputs "
                                   f"diverge through tensors only the candidate has")
    return report


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
