"""Checking a rewritten model before it is written: its structure (full ``onnx.checker``, strict shape
inference), each rewrite alone (:mod:`convgraph.engine.regions`: the new nodes against the nodes they replaced), and
the model outputs against the original's (:func:`convgraph.engine.verify.verify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx

from . import regions
from ..errors import CheckFailed
from ..progress import staged, track

if TYPE_CHECKING:
    from .rewrite_report import Change, RewriteReport

#: Exact rewrites must keep every rewritten node's output within this relative error (max abs error / max abs
#: reference, the new nodes against the old ones alone), float32 accumulation order being the only difference.
EXACT_RTOL = 1e-4


@staged("checking the result (onnx.checker, shape inference)")
def structural_checks(model: onnx.ModelProto) -> dict[str, Any]:
    """Full onnx.checker and strict shape inference; CheckFailed naming what broke."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:  # ValueError: Cast to=0
        raise CheckFailed(f"rewritten model fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
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
        worst = max(shown, key=lambda m: m.scaled_err, default=None)
        if worst is not None and not worst.scaled_err <= EXACT_RTOL:
            raise refuse(report, f"exact rewrites moved output {worst.name!r} by {worst.scaled_err:.3g} (max abs "
                                  f"error / max abs output) > {EXACT_RTOL}; refusing to write the result")


@staged("running the rewritten If branches no input took")
def check_branches(original, model, report: RewriteReport, feeds, input_shapes, values, provider: str, verify) -> None:
    """The model-level check of the rewrites in If branches the inputs did not take (:mod:`.branches`): run with
    the branch forced, an exact rewrite must keep the outputs within :data:`EXACT_RTOL`; a branch that cannot
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
        if all(report.changes[i].exact for i in b.changes) and worst is not None and not worst.scaled_err <= EXACT_RTOL:
            raise refuse(report, f"exact rewrites in {where} (run with its condition forced: no input took it) moved "
                                  f"output {worst.name!r} by {worst.scaled_err:.3g} (max abs error / max abs output) > "
                                  f"{EXACT_RTOL}; refusing to write the result")
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
