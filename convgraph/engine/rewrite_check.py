"""Checking a rewritten model before it is written: its structure (full ``onnx.checker``, strict shape
inference), each rewrite alone (:mod:`convgraph.engine.regions`: the new nodes against the nodes they replaced), and
the model outputs against the original's (:func:`convgraph.engine.verify.verify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx

from . import regions
from ..io import SPLIT_BYTES, byte_size, has_refs, skeleton
from ..errors import CheckFailed
from ..progress import staged, track

if TYPE_CHECKING:
    from .rewrite_report import Change, RewriteReport

#: Exact rewrites must keep every rewritten node's output within this relative error (max abs error / max abs
#: reference, the new nodes against the old ones alone), float32 accumulation order being the only difference.
EXACT_RTOL = 1e-4


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


def change_errors(model: onnx.ModelProto, changes: list[Change], checks: dict, feed: dict, provider: str) -> None:
    """Each change's own error: its new nodes against the nodes they replaced, run alone on the activations
    the rewritten model feeds them (main graph) and on standard-normal inputs of their shapes (exact rules
    everywhere, any rule in subgraphs), so that no other rewrite counts in it."""
    from ..run.runtime import run_with_outputs

    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    wanted = sorted({t for i, r in checks.items() if isinstance(r, regions.Region) and not changes[i].graph
                     for t in r.inputs if t in produced})
    acts = {k: v[0] for k, v in run_with_outputs(model, wanted, [feed], provider=provider).items()} if wanted else {}
    for i, c in enumerate(track(changes, "checking each rewrite alone")):
        region = checks.get(i)
        if not isinstance(region, regions.Region):
            c.checked_on = f"not checked alone: {region or 'no region'}"
            continue
        results, used = [], []
        if not c.graph and all(t in acts for t in region.inputs):
            results.append(regions.errors(region, acts, provider))
            used.append("activations")
        rand = regions.random_feeds(region) if c.exact or not used else None
        if rand is not None:
            results.append(regions.errors(region, rand, provider))
            used.append("random")
        if not results:
            c.checked_on = "not checked alone: input shapes unknown"
            continue
        c.output_error = max(e for e, _ in results)
        c.output_cosine = min(cos for _, cos in results)
        c.checked_on = "+".join(used)


def refuse(report: RewriteReport, message: str) -> CheckFailed:
    """A refusal that carries the report (``--json`` prints it)."""
    report.passed = False
    report.failures.append(message)
    e = CheckFailed(message)
    e.report = report  # type: ignore[attr-defined]
    return e


@staged("verifying numerics")
def numerics(original, model, report: RewriteReport, checks, input_shapes, inputs, input_options, atol, rtol,
              min_cosine, provider) -> None:
    from ..run.inputs import make_inputs
    from .verify import verify as run_verify

    feeds = make_inputs(original, inputs, input_shapes=input_shapes, **input_options)
    change_errors(model, report.changes, checks, feeds[0], provider)
    for c in report.changes:
        if c.exact and c.output_error is not None and not c.output_error <= EXACT_RTOL:
            raise refuse(report, f"exact rule {c.rule} on node {c.node!r} leaves tolerance: its output differs from the "
                                  f"replaced nodes' by {c.output_error:.3g} (max abs error / max abs output, "
                                  f"{c.checked_on}) > {EXACT_RTOL}; refusing to write the result")
    vr = run_verify(original, model, inputs=feeds, input_shapes=input_shapes, provider=provider,
                    **{k: v for k, v in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine)) if v is not None})
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
        worst = max(shown, key=lambda m: m.scaled_err, default=None)
        if worst is not None and not worst.scaled_err <= EXACT_RTOL:
            raise refuse(report, f"exact rewrites moved output {worst.name!r} by {worst.scaled_err:.3g} (max abs "
                                  f"error / max abs output) > {EXACT_RTOL}; refusing to write the result")
