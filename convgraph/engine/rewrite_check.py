"""Checking a rewritten model before it is written: its structure (full ``onnx.checker``, strict shape
inference), each rewrite alone (:mod:`convgraph.engine.regions`: the new nodes against the nodes they replaced), and
the model outputs against the original's (:func:`convgraph.engine.verify.verify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx

from . import regions
from ..io import SPLIT_BYTES, byte_size, has_refs, skeleton
from ..run import tolerance
from ..errors import CheckFailed
from ..progress import staged, track

if TYPE_CHECKING:
    from .rewrite_report import Change, RewriteReport

#: Exact rewrites in float32 must keep every rewritten node's output within this relative error (max abs error / max
#: abs reference, the new nodes against the old ones alone); other types and requantized int8: convgraph.run.tolerance.
EXACT_RTOL = tolerance.FLOOR


@staged("checking the result (onnx.checker, shape inference)")
def structural_checks(model: onnx.ModelProto) -> dict[str, Any]:
    """Full onnx.checker and strict shape inference; CheckFailed naming what broke. A big model is checked
    as its skeleton (:func:`convgraph.io.skeleton`: the weights never serialized)."""
    big = has_refs(model) or byte_size(model) > SPLIT_BYTES
    try:
        onnx.checker.check_model(skeleton(model, inputs=True) if big else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:  # ValueError: Cast to=0
        raise CheckFailed(f"rewritten model fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
    try:
        onnx.shape_inference.infer_shapes(skeleton(model) if big else model, check_type=True, strict_mode=True)
        strict = True
    except onnx.shape_inference.InferenceError as e:
        msg = str(e).strip().splitlines()[0]
        if "com.microsoft" not in msg and "domain" not in msg.lower():
            raise CheckFailed(f"rewritten model fails strict shape inference: {msg}") from None
        strict = False  # custom-domain ops cannot be inferred strictly; the original had them too
    return {"checker": "passed (full)", "shape_inference": "strict" if strict else "partial (custom ops)"}


def change_errors(model: onnx.ModelProto, changes: list[Change], checks: dict, feed: dict, provider: str,
                  floats: dict | None = None) -> None:
    """Each change's own error: its new nodes against the nodes they replaced, run alone on the activations
    the rewritten model feeds them (main graph) and on standard-normal inputs of their shapes (exact float rules
    everywhere, any rule in subgraphs), so that no other rewrite counts in it. Quantized nodes run as onnxruntime
    runs them (int8 kernels) and on activations only (their ranges are calibrated for real ones). ``floats``:
    change → (region, bound) of a requantized exact change's float replacement, whose error must hold that bound."""
    from ..run.runtime import run_with_outputs

    floats = floats or {}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    wanted = sorted({t for i, r in [*checks.items(), *((k, v[0]) for k, v in floats.items())]
                     if isinstance(r, regions.Region) and not changes[i].graph for t in r.inputs if t in produced})
    acts = {k: v[0] for k, v in run_with_outputs(model, wanted, [feed], provider=provider).items()} if wanted else {}
    for i, c in enumerate(track(changes, "checking each rewrite alone")):
        region = checks.get(i)
        if not isinstance(region, regions.Region):
            c.checked_on = f"not checked alone: {region or 'no region'}"
            continue
        level = "all" if c.quantized else "basic"
        results, used = [], []
        if not c.graph and all(t in acts for t in region.inputs):
            results.append(regions.errors(region, acts, provider, level))
            used.append("activations")
        rand = regions.random_feeds(region) if (c.exact and not c.quantized) or not used else None
        if rand is not None:
            results.append(regions.errors(region, rand, provider, level))
            used.append("random")
        if not results:
            c.checked_on = "not checked alone: input shapes unknown"
            continue
        c.output_error = max(e for e, _, _ in results)
        c.output_cosine = min(cos for _, cos, _ in results)
        c.output_rms = max(r for _, _, r in results)
        c.checked_on = "+".join(used)


def refuse(report: RewriteReport, message: str) -> CheckFailed:
    """A refusal that carries the report (``--json`` prints it)."""
    report.passed = False
    report.failures.append(message)
    e = CheckFailed(message)
    e.report = report  # type: ignore[attr-defined]
    return e


def _float_steps(report: RewriteReport, floats: dict, acts_feed: dict, model, provider: str) -> None:
    """A requantized exact change's float replacement (before quantizing) must hold the float bound: the rule's
    arithmetic is exact; only then is the quantized one judged against its requantization noise."""
    from ..run.runtime import run_with_outputs

    wanted = sorted({t for r, _ in floats.values() for t in r.inputs})
    acts = {k: v[0] for k, v in run_with_outputs(model, wanted, [acts_feed], provider=provider).items()} if wanted else {}
    for i, (region, bound) in floats.items():
        c = report.changes[i]
        feeds = [f for f in (acts if all(t in acts for t in region.inputs) else None, regions.random_feeds(region)) if f]
        worst = max((regions.errors(region, f, provider)[0] for f in feeds), default=None)
        b = tolerance.Bound(**bound)
        if worst is not None and not b.holds(scaled=worst):
            raise refuse(report, f"exact rule {c.rule} on node {c.node!r} is not exact before requantizing: its float "
                                 f"replacement differs from the replaced nodes by {worst:.3g} > {b.describe()}; refusing "
                                 f"to write the result")


def _output_types(model: onnx.ModelProto) -> dict[str, int]:
    return {o.name: o.type.tensor_type.elem_type for o in model.graph.output}


@staged("verifying numerics")
def numerics(original, model, report: RewriteReport, checks, input_shapes, inputs, input_options, atol, rtol,
             min_cosine, provider, floats: dict | None = None) -> None:
    from ..run.inputs import make_inputs
    from .verify import verify as run_verify

    feeds = make_inputs(original, inputs, input_shapes=input_shapes, **input_options)
    change_errors(model, report.changes, checks, feeds[0], provider)
    if floats:
        _float_steps(report, floats, feeds[0], model, provider)
    for c in report.changes:
        if not c.exact or c.tolerance is None:
            continue
        b = tolerance.Bound(**c.tolerance)
        got = {"scaled": c.output_error, "rms": c.output_rms, "cosine": c.output_cosine}
        if b.holds(**got) is False:
            raise refuse(report, f"exact rule {c.rule} on node {c.node!r} leaves tolerance: its output differs from the "
                                  f"replaced nodes' by {b.measured(**got):.3g} ({c.checked_on}), beyond {b.describe()}; "
                                  f"refusing to write the result")
    types = _output_types(original)
    # verify's unset atol/rtol follow the outputs' type (``tolerance_basis`` says why when not float32's)
    vr = run_verify(original, model, inputs=feeds, input_shapes=input_shapes, provider=provider, atol=atol, rtol=rtol,
                    min_cosine=min_cosine)
    check_branches(original, model, report, feeds, input_shapes, input_options.get("values"), provider, run_verify)
    report.verification = vr.to_dict()
    report.tolerance_required = atol is not None or rtol is not None or min_cosine is not None
    if report.tolerance_required and not vr.passed:
        report.passed = False
        report.failures.append(f"model outputs {vr.verdict}: {vr.summary()}")
    if all(c.exact for c in report.changes):
        # every change exact: the model's outputs must agree too, on the outputs these inputs can show anything on
        shown = [m for m in vr.outputs.values() if len(m.degenerate_samples) < m.samples]
        unseen = [m for m in vr.outputs.values() if len(m.degenerate_samples) == m.samples and m.samples]
        for m in unseen:
            report.warnings.append(f"output {m.name!r} says nothing on these inputs ({m.degenerate_reason}): the "
                                   f"model-level check of the exact rewrites could not use it; the rewritten nodes "
                                   f"were checked alone")
        bounds = _model_bounds(original, report, shown, feeds, input_shapes, provider, types)
        for m in shown:
            b, got = bounds[m.name], {"scaled": m.scaled_err, "cosine": m.cosine}
            if not b.holds(**got):
                raise refuse(report, f"exact rewrites moved output {m.name!r} by {b.measured(**got):.3g}, beyond "
                                      f"{b.describe()}; refusing to write the result")


def _model_bounds(original, report: RewriteReport, shown, feeds, input_shapes, provider, types) -> dict:
    """Per model output, what exact rewrites may move it by: its type's rounding; with requantized changes, twice
    the int8 original's own activation quantization noise there (:func:`convgraph.run.tolerance.twin_bound`)."""
    bounds = {m.name: tolerance.for_type(types.get(m.name)) for m in shown}
    if shown and any(c.quantized for c in report.changes):
        from .quantize import float_twin
        from .verify import verify as run_verify

        twin = run_verify(original, float_twin(original), inputs=feeds, input_shapes=input_shapes, provider=provider)
        for m in shown:
            bounds[m.name] = tolerance.twin_bound(twin.outputs[m.name].cosine)
    report.checks["model tolerance"] = "; ".join(f"{n}: {b.describe()}" for n, b in bounds.items())
    return bounds


@staged("running the rewritten If branches no input took")
def check_branches(original, model, report: RewriteReport, feeds, input_shapes, values, provider: str, verify) -> None:
    """The model-level check of the rewrites in If branches the inputs did not take (:mod:`.branches`): run with
    the branch forced, an exact rewrite must keep the outputs within their type's bound; a branch that cannot
    run is named, and an exact rewrite there that nothing checked fails the rewrite (``--keep-failed`` writes it)."""
    from . import branches as br

    ifs, unreached = br.branches(model, report.changes, input_shapes, values)
    if ifs:
        br.taken(model, ifs, [feeds[i] for i in range(len(feeds))], provider)
    for b in ifs:
        if b.taken:
            continue
        where = f"the {'then' if b.then else 'else'} branch of the If making {b.if_output!r}"
        vr = br.check_forced(original, model, b, feeds, input_shapes, provider, verify)
        if vr is None:
            unreached[b.path] = f"{where}, which no input took; {b.forced}"
            continue
        shown = [m for m in vr.outputs.values() if len(m.degenerate_samples) < m.samples]
        worst = max(shown, key=lambda m: m.scaled_err, default=None)
        for i in b.changes:
            report.changes[i].checked_on += "; model outputs with the branch forced"
        if worst is not None and all(report.changes[i].exact for i in b.changes):
            bound = tolerance.for_type(_output_types(original).get(worst.name))
            if not bound.holds(scaled=worst.scaled_err):
                raise refuse(report, f"exact rewrites in {where} (run with its condition forced: no input took it) "
                                      f"moved output {worst.name!r} by {worst.scaled_err:.3g}, beyond "
                                      f"{bound.describe()}; refusing to write the result")
        err = f"{worst.scaled_err:.3g}" if worst is not None else "not shown: the outputs say nothing there"
        report.warnings.append(f"no input took {where}: the model-level check ran it with its condition forced "
                               f"(scaled output error {err})")
    for path, why in unreached.items():
        here = [c for c in report.changes if c.graph == path]
        blind = [c for c in here if c.output_error is None]
        names = ", ".join(f"{c.node} ({c.rule})" for c in (blind or here)[:3])
        if any(c.exact for c in blind):
            report.passed = False
            report.failures.append(f"exact rewrites {names} in {path} were checked neither alone "
                                   f"({blind[0].checked_on.removeprefix('not checked alone: ')}) nor by the model "
                                   f"outputs ({why}); give inputs that run it (--inputs, --input-value) or leave them out "
                                   f"(--exclude)")
        else:
            report.warnings.append(f"the model-level check could not run {path} ({why}): {names} "
                                   f"{'checked alone only' if not blind else 'not checked'}")
