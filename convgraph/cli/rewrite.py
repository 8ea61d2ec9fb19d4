"""``convgraph rewrite``: apply rules to a model's convs, check the result, write it."""

from __future__ import annotations

import click

from ..errors import CheckFailed, UsageError
from ..io import check_output_path, write_model
from ..analysis.report import cost
from ..engine.rewrite import Selection, rewrite
from ..run.tolerance import Bound, summarize
from . import cli
from .common import (
    emit_json, err, input_data_kwargs, input_data_options, input_shape_option, json_option, out, probe_option,
    provider_option,
    warn)
from .progress import shows_progress
from .tables import Column, show, wide_option

#: The rewritten-nodes table; at narrow widths the droppable columns go, lowest rank first.
_CHANGE_COLUMNS = (
    Column("node", "name"), Column("rule"), Column("kind before → after", drop=3),
    Column("MACs before → after", "num"), Column("params before → after", "num", drop=4),
    Column("exact", drop=5), Column("weight err", "num", drop=2), Column("output err", "num", drop=6),
    Column("output cos", "num", drop=1),
)


def _fmt(v, spec=",") -> str:
    return "?" if v is None else format(v, spec)


def _macs(v, expr) -> str:
    """MACs: the number, else the formula (dims left dynamic), as analyze shows it."""
    return _fmt(v) if v is not None or expr is None else cost(None, expr)


def _params(ctx, param, values) -> dict[str, str]:
    parsed = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE", param=param)
        k, val = v.split("=", 1)
        parsed[k.strip()] = val.strip()
    return parsed


def _unapplied(report) -> list[str]:
    """Per rule that rewrote no conv, one line: why, the reasons grouped (``--explain`` lists each conv); rules
    with the same reasons share a line."""
    done = {c.rule for c in report.changes}
    said: dict[str, list[str]] = {}  # the reasons' text -> the rules it holds for
    for rule in dict.fromkeys(e.rule for e in report.explain):
        if rule in done:
            continue
        groups: dict[str, list[str]] = {}
        failed = set()
        for e in report.explain:
            if e.rule == rule:
                groups.setdefault(e.reason, []).append(e.node)
                if e.skipped:
                    failed.add(e.reason)
        ranked = sorted(groups.items(), key=lambda kv: (kv[0] not in failed, -len(kv[1])))  # failures first
        text = "; ".join(f"{reason} ({_nodes(nodes)})" for reason, nodes in ranked[:3])
        more = f"; {len(ranked) - 3} more reasons (--explain)" if len(ranked) > 3 else ""
        n = sum(len(v) for v in groups.values())
        said.setdefault(f"none of {n} conv{'s' * (n != 1)} rewritten: {text}{more}", []).append(rule)
    return [f"{', '.join(rules)}: {text}" for text, rules in said.items()]


def _nodes(nodes: list[str]) -> str:
    return ", ".join(nodes) if len(nodes) <= 2 else f"{len(nodes)} convs: {nodes[0]}, {nodes[1]}, …"


def render(report) -> None:
    """The human report: rewritten nodes, model-level error and latency, totals."""
    if not report.changes:
        out.print("[yellow]nothing rewritten[/yellow]" + (" (dry run)" if report.dry_run else ""))
    for line in _unapplied(report):
        out.print(line, markup=False)
    if report.changes:
        show(_CHANGE_COLUMNS, [(c.node, c.rule, f"{c.kind_before} → {c.kind_after}",
                                f"{_macs(c.macs_before, c.macs_before_expr)} → {_macs(c.macs_after, c.macs_after_expr)}",
                                f"{c.params_before:,} → {c.params_after:,}",
                                "yes" if c.exact else "no", _fmt(c.weight_error, ".3g"), _fmt(c.output_error, ".3g"),
                                _fmt(c.output_cosine, ".6f")) for c in report.changes],
             title="dry run: would rewrite" if report.dry_run else "rewritten nodes")
        tot = report.totals
        before, after = tot["macs_before"], tot["macs_after"]
        ratio = ""
        if before and after and before != after:
            ratio = f" ({before / after:.2f}× fewer)" if after < before else f" ({after / before:.2f}× more)"
        n = tot["rewritten"]
        steps = f" in {tot['changes']} changes" if tot["changes"] != n else ""
        shown = (_macs(before, tot.get("macs_before_expr")), _macs(after, tot.get("macs_after_expr")))
        out.print(f"{n} conv{'s' * (n != 1)} rewritten{steps}: MACs {shown[0]} → {shown[1]}{ratio}, "
                  f"params {_fmt(tot['params_before'])} → {_fmt(tot['params_after'])}")
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    checks = {k: v for k, v in report.checks.items() if k != "model tolerance"}
    if checks:
        out.print("checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()), markup=False)
    held = summarize(Bound(**c.tolerance) for c in report.changes if c.exact and c.tolerance)
    if held:
        out.print("exact changes, each alone: " + "; ".join(held), markup=False)
    if "model tolerance" in report.checks:
        out.print(f"exact changes, at the model outputs: {report.checks['model tolerance']}", markup=False)
    if report.verification:
        v = report.verification
        verdict = {"passed": "PASS", "failed": "FAIL"}.get(v.get("verdict"), "INCONCLUSIVE")
        if not report.tolerance_required:
            basis = f", {v['tolerance_basis']}" if v.get("tolerance_basis") else ""
            verdict = (f"{verdict.lower()} at the default tolerance{basis} (not required: give "
                       "--atol/--rtol/--min-cosine)")
        rows = v.get("outputs", {})
        keys = [k for k in ("max_abs_err", "scaled_err", "mean_abs_err", "cosine", "snr_db", "top1") if any(k in m for m in rows.values())]
        show([Column("output", "name"), *(Column(k, "num") for k in keys)],
             [(name, *[_fmt(m.get(k), ".4g") for k in keys]) for name, m in rows.items()],
             title=f"model outputs vs original: {verdict}")
    if report.latency:
        lat = report.latency
        out.print("latency: " + lat.get("summary", str(lat)))


def _explain(report) -> None:
    show([Column("node", "name"), Column("rule"), Column("applies"), Column("reason")],
         [(e.node, e.rule, "yes" if e.applies else "no", e.reason) for e in report.explain],
         title="rule matching, per conv")


def _time_estimates(model, report, input_shapes, data, threads, provider) -> dict:
    """``{"profile", "time_estimates"}``: the original profiled, each change's time saved estimated."""
    from ..model.loader import load
    from ..analysis.profile import change_estimates

    data = dict(data)
    cg = load(model, input_shapes, input_values=data.get("values"))
    prof, rows = change_estimates(cg, report.changes, inputs=data.pop("inputs"), seed=data.pop("seed"),
                                  input_shapes=input_shapes or None, provider=provider, threads=threads,
                                  input_options=data)
    for w in prof.warnings():
        warn(w)
    return {"profile": prof.to_dict(), "time_estimates": rows}


def _render_estimates(estimates: dict) -> None:
    p = estimates["profile"]
    show([Column("node", "name"), Column("rule"), Column("time ms", "num"), Column("saved ms (est.)", "num")],
         [[e["node"], e["rule"], _fmt(e["time_ms"], ".3f"), _fmt(e["saved_ms_estimate"], ".3f")]
          for e in estimates["time_estimates"]], title="expected time saved (estimate: measured time × MAC saving)")
    saved = [e["saved_ms_estimate"] for e in estimates["time_estimates"] if e["saved_ms_estimate"] is not None]
    if saved:
        out.print(f"estimated total: {sum(saved):.3f} ms of the model's {p['time_ms']:.3f} ms (median, profiled)")


@cli.command("rewrite")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--rule", "rules", multiple=True, required=True, help="Rule to apply (repeatable; see `convgraph rules`).")
@click.option("--param", "params", multiple=True, callback=_params, metavar="KEY=VALUE",
              help="Rule parameter, e.g. rank=full (repeatable).")
@click.option("--nodes", help="Only convs whose name matches this regex.")
@click.option("--exclude", help="Skip convs whose name matches this regex.")
@click.option("--kind", "kinds", multiple=True, help="Only convs of this kind (standard, pointwise, ...; repeatable).")
@click.option("--min-macs", type=int, help="Only convs with at least this many MACs.")
@input_shape_option
@input_data_options
@click.option("--calib", type=click.Path(), help="Calibration inputs (.npz or a folder of images): approximate "
              "rules fit on the activations the model really sees (fit=data); int8 calibrates its activation ranges "
              "on them (required there).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime numerics check.")
@click.option("--atol", type=float, help="Require model outputs within this absolute tolerance (exit 1 otherwise).")
@click.option("--rtol", type=float, help="Require model outputs within this relative tolerance.")
@click.option("--min-cosine", type=float, help="Require each output's cosine similarity to the original ≥ this.")
@click.option("--bench/--no-bench", default=True, show_default=True, help="Time original vs rewritten (onnxruntime).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model for --bench.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads for --bench (default: onnxruntime's).")
@provider_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the rewritten model.")
@click.option("--in-place", is_flag=True, help="Allow -o to name the input model.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when a tolerance is exceeded.")
@click.option("--dry-run", is_flag=True, help="List what would change (MACs/params before → after); write nothing.")
@click.option("--explain", is_flag=True, help="For each conv, each rule and why it did or did not apply.")
@probe_option
@click.option("--profile", "profiled", is_flag=True, help="Profile the original model (onnxruntime's profiler, "
              "--threads/--provider) and show each change's expected time saved: an estimate, the conv's measured "
              "time × its MAC saving.")
@json_option
@wide_option
@shows_progress
def rewrite_command(model, rules, params, nodes, exclude, kinds, min_macs, input_shapes, calib, no_verify, atol, rtol,
                    min_cosine, bench, runs, threads, provider, output, in_place, keep_failed, dry_run, explain, probe,
                    as_json, profiled=False, **kw) -> None:
    """Rewrite the convs of MODEL with one or more rules, check the result and write it to -o."""
    if not output and not (dry_run or explain):
        raise UsageError("-o/--output is required (or use --dry-run / --explain)")
    if output:
        check_output_path(output, model, in_place)
    data = input_data_kwargs(kw)
    given = dict(data)  # the rewrite takes its inputs out of data; --profile needs them too
    try:
        result = rewrite(model, list(rules), params=params, input_shapes=input_shapes, inputs=data.pop("inputs"),
                         input_options=data, calib=calib,
                         selection=Selection(nodes, exclude, tuple(kinds), min_macs), verify=not no_verify, atol=atol,
                         rtol=rtol, min_cosine=min_cosine, bench=bench and not dry_run, bench_runs=runs, threads=threads,
                         provider=provider, dry_run=dry_run, probe=probe)
    except CheckFailed as e:  # a refused rewrite: the report says what was found, then the one-line error
        refused = getattr(e, "report", None)
        if refused is not None:
            if as_json:
                emit_json({**refused.to_dict(), "refused": str(e), "output": None})
            else:
                render(refused)
        raise
    report = result.report
    for w in report.warnings:
        warn(w)
    estimates = _time_estimates(model, report, input_shapes, given, threads, provider) if profiled else None
    written = None
    if output and result.model is not None and (report.passed or keep_failed and report.changes) and not dry_run:
        written = str(write_model(result.model, output, input_path=model, in_place=in_place))
    if as_json:
        emit_json({**report.to_dict(), "output": written, **(estimates or {})})
    else:
        if explain:
            _explain(report)
        render(report)
        if estimates:
            _render_estimates(estimates)
        if written:
            out.print(f"wrote {written}")
        elif output and not dry_run and report.changes:
            warn(f"not written: {'; '.join(report.failures)} (use --keep-failed to write it anyway)")
    if not report.passed:
        tolerance = report.tolerance_required and any(f.startswith("model outputs") for f in report.failures)
        err.print(f"convgraph: {report.failures[0]}; not written" if not report.changes
                  else "convgraph: rewrite outside the given tolerance" if tolerance
                  else f"convgraph: rewrite failed its checks: {report.failures[0].split('; ')[0]}", markup=False)
        raise click.exceptions.Exit(1)
