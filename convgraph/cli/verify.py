"""``convgraph verify REF CANDIDATE``: compare two models' outputs with onnxruntime; exit 1 outside tolerance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.markup import escape
from rich.text import Text

from ..errors import CheckFailed, UsageError
from ..engine.verify import VerifyReport, verify
from ..run.metrics import weak_notes
from . import cli
from .common import (
    emit_json, input_data_kwargs, input_data_options, input_shape_option, json_option, note, out, provider_option,
    warn)
from .progress import shows_progress
from .tables import Column, show, wide_option


def _num(v: float | None, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _tensor_map(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--tensor-map {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UsageError(f"--tensor-map {path}: expected a JSON object {{candidate tensor: reference tensor}}")
    return data


#: The metrics table; at narrow widths the droppable columns go, lowest rank first.
_METRIC_COLUMNS = (
    Column("output", "name"), Column("shape", "num", "left", drop=6), Column("max abs", "num"),
    Column("max rel", "num", drop=4), Column("mean abs", "num", drop=5), Column("cosine", "num"),
    Column("SNR dB", "num", drop=7), Column("top-1", "num", drop=3), Column("min atol", "num", drop=2),
    Column("min rtol", "num", drop=1), Column(""),
)


def _part_rows(m, tol, names) -> list[tuple]:
    """One row per part of ``m`` (an output split by scale): its slice, errors, worst sample, verdict."""
    rows = []
    for p in m.parts:
        if p.worst_sample is None:
            verdict = f"[yellow]silent[/yellow] ({p.degenerate_reason}), not judged"
        else:
            low = tol.min_cosine is not None and not p.cosine >= tol.min_cosine
            verdict = ("[red]FAIL[/red]" if low else "[green]ok[/green]") + f" worst: {names(p.worst_sample)}"
            if p.name == m.decided_by:
                verdict += " [bold](decides)[/bold]"
        rows.append(("  " + p.name[len(m.name):], "", _num(p.max_abs_err), "", "", _num(p.cosine, ".6f"),
                     _num(p.snr_db, ".1f"), "", "", "", Text.from_markup(verdict)))
    return rows


def _metrics_table(title: str, metrics: dict, report: VerifyReport) -> None:
    rows = []
    for name, m in metrics.items():
        verdict = ("[green]ok[/green]" if m.passed else "[yellow]INCONCLUSIVE[/yellow]" if m.inconclusive
                   else "[red]FAIL[/red]")
        if m.degenerate_samples and m.samples > 1:
            verdict += f" ({len(m.degenerate_samples)}/{m.samples} uninformative)"
        if m.error:
            rows.append((name, "x".join(map(str, m.shape or ())), *["-"] * 8, Text.from_markup(f"{verdict} {m.error}")))
            continue
        rows.append((name, "x".join(map(str, m.shape or ())), _num(m.max_abs_err), _num(m.max_rel_err),
                     _num(m.mean_abs_err), _num(m.cosine, ".6f"), _num(m.snr_db, ".1f"),
                     "-" if m.top1 is None else f"{m.top1:.0%}", _num(m.min_atol), _num(m.min_rtol),
                     Text.from_markup(verdict + (f" ({m.nan} NaN)" if m.nan else ""))))
        rows += _part_rows(m, report.tolerance, report.sample_name)
    show(_METRIC_COLUMNS, rows, title=title)
    for name, m in metrics.items():
        bad = report.failing(m)
        if bad and m.samples > 1:
            out.print(escape(f"{name}: out of tolerance on {len(bad)} of {m.samples} samples: {', '.join(bad)}"),
                      highlight=False)
        if m.note:
            out.print(escape(f"{name}: {m.note}"), highlight=False)


def render(report: VerifyReport) -> None:
    """The human-readable report on stdout."""
    out.print(f"inputs: {report.inputs}; provider {report.provider}; tolerance {report.tolerance.describe()}")
    _metrics_table("candidate vs reference (onnxruntime)" + (" on the tensors given" if report.tensors else ""),
                   report.outputs, report)
    ev = report.reference_evaluator
    if ev:
        _metrics_table("onnxruntime vs onnx.reference, reference model", ev["reference"], report)
        _metrics_table("candidate (onnxruntime) vs onnx.reference on the reference model", ev["candidate"], report)
    loc = report.localization
    if loc is not None:
        where = f"sample {loc.sample}, {loc.compared} shared intermediate tensors compared"
        if loc.unmatched:
            where += f", {loc.unmatched} only in the candidate"
        if loc.first_divergent_node is None or loc.tensor is None:  # set together
            out.print(f"localization ({where}): no intermediate tensor leaves tolerance")
        else:
            m = loc.tensor
            out.print(f"localization ({where}): first divergent node [bold]{loc.first_divergent_node}[/bold] "
                      f"({loc.first_divergent_op}) → {loc.first_divergent_tensor}: max abs err {_num(m.max_abs_err)}, "
                      f"cosine {_num(m.cosine, '.6f')}; {loc.divergent} tensor(s) out of tolerance")
            if loc.first_divergent_origin:
                rule = (loc.rewrite or {}).get("rule")
                out.print(f"  it replaced {loc.first_divergent_origin}" + (f" (rule {rule})" if rule else ""))
            if loc.shown_at_node:
                out.print(f"  the tolerance is first left at the output of {loc.shown_at_node}, an unchanged node "
                          f"that carries the error from upstream")
            if len(loc.region) > 1:
                out.print(f"  candidate nodes between its inputs and that tensor: {', '.join(loc.region)}")
            ins = ", ".join(i["tensor"] + (" (graph input)" if i.get("graph_input") else f" (max abs err {_num(i['max_abs_err'])})")
                            for i in loc.inputs)
            if ins:
                out.print(f"  its inputs, within tolerance: {ins}")
    label = {"passed": "[green]PASSED[/green]", "failed": "[red]FAILED[/red]",
             "inconclusive": "[yellow]INCONCLUSIVE[/yellow]"}[report.verdict]
    summary = report.summary()
    out.print(f"{label}: {summary.removeprefix(report.verdict + ': ')}")


@cli.command("verify")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@input_data_options
@input_shape_option
@click.option("--atol", type=float, help="Absolute tolerance (default 1e-4, float16 outputs 9.8e-3, bfloat16 7.8e-2; an "
              "element fails only beyond atol AND rtol).")
@click.option("--rtol", type=float, help="Relative tolerance (default 1e-3, float16 outputs 9.8e-3, bfloat16 7.8e-2).")
@click.option("--min-cosine", type=float, help="Minimum cosine similarity per output; alone, it replaces atol/rtol.")
@click.option("--tensor", "tensors", multiple=True, metavar="NAME",
              help="Judge this tensor instead of the outputs (repeatable; any tensor both models have, "
                   "intermediate ones included).")
@click.option("--localize", is_flag=True, help="Find the first candidate node whose output leaves tolerance.")
@click.option("--tensor-map", type=click.Path(), help="JSON {candidate tensor: reference tensor} for --localize "
              "(default: the rewrite record in the candidate's metadata).")
@click.option("--reference", "reference_evaluator", is_flag=True,
              help="Also compare with onnx.reference.ReferenceEvaluator on the reference model (small models).")
@provider_option
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's).")
@json_option
@wide_option
@shows_progress
def verify_command(reference, candidate, input_shapes, atol, rtol, min_cosine, tensors, localize, tensor_map,
                   reference_evaluator, provider, threads, as_json, **kw) -> None:
    """Run REFERENCE and CANDIDATE on the same inputs and compare their outputs.

    Exit 0 within tolerance, 1 outside or inconclusive (an output of the reference says nothing on every
    input: pass real data with --inputs), 2 for unusable models or arguments. Cosine and SNR are judged
    per sample (the worst counts) and per part: an output whose parts differ in scale a hundredfold (a
    detector's boxes beside its class scores) is split and each part judged alone.
    """
    data = input_data_kwargs(kw)
    report = verify(reference, candidate, input_shapes=input_shapes, atol=atol, rtol=rtol, min_cosine=min_cosine,
                    localize=localize, provider=provider, reference_evaluator=reference_evaluator,
                    tensor_map=_tensor_map(tensor_map), threads=threads, tensors=tensors or None, **data)
    if as_json:
        emit_json(report.to_dict())
    else:
        for w in report.warnings:
            warn(w)
        if report.judged_beside:
            from ..run.offsets import note as beside

            note(beside(report.judged_beside))
        for weak in weak_notes(report.outputs.values(), report.sample_names):
            note(weak)
        if report.tolerance_basis:
            out.print(f"tolerance by type: {report.tolerance_basis}", markup=False)
        render(report)
    if not report.passed:
        raise CheckFailed(report.summary())
