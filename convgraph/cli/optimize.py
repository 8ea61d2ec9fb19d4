"""``convgraph optimize``: choose per conv the rewrite with the most measured speed within an error budget."""

from __future__ import annotations

import click

from ..errors import UsageError
from ..io import check_output_path, write_model
from ..optimize import (
    DEFAULT_RANKS, DEFAULT_RULES, METRICS, OptimizeReport, TimingCache, check_plot_path, optimize, plot_pareto)
from ..progress import stage
from ..engine.rewrite import Selection
from . import cli
from .common import (
    _number_list, emit_json, err, image_options, input_shape_option, input_value_option, json_option, out, provider_option,
    note, warn)
from .progress import shows_progress
from .tables import Column, show, wide_option


def _names(ctx, param, value) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _fit_cell(notes: str) -> str:
    """A chosen rewrite's fit in a few words: the notes' first clause and the layer's output error (the whole
    notes are in --json)."""
    import re

    err = re.search(r"output error ([0-9.e+-]+)", notes)
    head = notes.split(";")[0]
    return head + (f"; output error {err.group(1)}" if err and err.group(0) not in head else "")


def render(report: OptimizeReport) -> None:
    """The human report: per-layer choices, the evaluated prefixes, the verdict."""
    if report.chosen:
        show([Column("node", "name"), Column("rule"), Column("params", drop=3), Column("kind after", drop=2),
              Column("layer saving ms", "num"), Column("won", "num", drop=4), Column("error alone", "num"),
              Column("fit", "line", drop=1)],
             [(c.node, c.rule, ",".join(f"{k}={v}" for k, v in c.params.items()), c.kind_after, f"{c.saving_ms:.3f}",
               "" if c.faster_share is None else f"{c.faster_share:.0%}",
               "?" if c.error_alone is None else f"{'≈' if c.error_estimated else ''}{c.error_alone:.2e}",
               _fit_cell(c.notes)) for c in report.chosen],
             title="chosen rewrites (per conv)")
    if report.points:
        show([Column("steps", "num"), Column("convs", "num", drop=2), Column("original ms", "num", drop=1),
              Column("predicted ms", "num", drop=3), Column("measured ms", "num"), Column("speed-up", "num"),
              Column("won", "num", drop=4), Column("fit", drop=5), Column(report.metric, "num"),
              Column("within budget")],
             [(str(p.steps), str(p.convs), f"{p.original_ms:.2f}", f"{p.predicted_ms:.2f}", f"{p.measured_ms:.2f}",
               f"{p.speedup:.2f}×", "" if p.faster_share is None else f"{p.faster_share:.0%}", p.fit,
               f"{p.metric:.6g}", "yes" if p.passed else "no") for p in report.points],
             title="prefixes of the greedy sequence, built and judged on the held-out set")
    if report.outputs:
        rows = []
        for name, m in report.outputs.items():
            d = m.get("distribution") or {}
            rows.append((name, str(d.get("judged", "")), str(len(d.get("excluded", []))),
                         *("" if d.get(k) is None else f"{d[k]:.6g}" for k in ("min", "p5", "median")),
                         str(d.get("worst_sample") or "")))
            rows += [("  " + p["part"][len(name):], "", "", "" if p["min"] is None else f"{p['min']:.6g}", "", "",
                      f"silent: {p['silent']}" if p["silent"] else str(p["worst_sample"] or "")
                      + (" (decides)" if p["part"] == m.get("decided_by") else ""))
                     for p in m.get("part_distribution") or []]
        show([Column("tensor", "name"), Column("samples", "num"), Column("left out", "num"), Column("min", "num"),
              Column("5th pct", "num"), Column("median", "num"), Column("worst sample", drop=1)], rows,
             title=f"held-out {report.metric} per sample, returned model (budget on the {report.held_on})")
    for n in report.notes:
        (warn if n in report.warnings else note)(n)
    out.print(report.summary())


@cli.command("optimize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(),
              help="Calibration inputs: a folder of images or an .npz (arrays named after the inputs).")
@click.option("--heldout", type=click.Path(),
              help="Held-out inputs the budget is checked on (default: every 4th calibration sample, kept apart).")
@click.option("--budget", type=float, default=0.99, show_default=True,
              help="Least allowed value of --metric on the held-out set (cosine, top1: in (0,1]; snr: dB).")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
@click.option("--rules", callback=_names, default=",".join(DEFAULT_RULES), show_default=True,
              help="Comma-separated rules to choose from.")
@click.option("--ranks", callback=_number_list(int), default=",".join(map(str, DEFAULT_RANKS)), show_default=True,
              help="Ranks tried for rules that take one.")
@click.option("--shares", callback=_names, help="Ranks tried for low-rank, as shares of its full rank "
              "[default: 1/16,1/8,1/4,3/8,1/2].")
@click.option("--quantile", type=float, help="Hold the budget on this share of the held-out samples (e.g. 0.95) "
              "instead of on every one (the worst).")
@click.option("--tensor", "tensors", multiple=True,
              help="Judge these tensors instead of the model outputs (repeatable; the worst counts).")
@click.option("--nodes", help="Only convs whose name matches this regex.")
@click.option("--exclude", help="Skip convs whose name matches this regex.")
@click.option("--min-macs", type=int, help="Only convs with at least this many MACs.")
@provider_option
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads for every latency measured (0: onnxruntime's default); "
                   "calibration and error runs use every core.")
@click.option("--samples", type=int, help="Use at most this many calibration samples.")
@image_options
@input_shape_option
@input_value_option
@click.option("--max-evals", type=int, default=12, show_default=True, help="Prefixes built and judged in the search.")
@click.option("--refit", is_flag=True,
              help="Refit the prefix found (and the next longer one) conv by conv on the activations of the model "
                   "rewritten so far, and keep what judges better (slower).")
@click.option("--judge-all", is_flag=True,
              help="Judge every candidate in the whole model instead of two per conv, the others' errors scaled "
                   "from their layers' own errors (slower).")
@click.option("--time-budget", type=float, help="Seconds the run may take: then the best verified result so far.")
@click.option("--no-timing-cache", is_flag=True, help="Time every layer afresh instead of reusing timings of "
              "identical layers (same setting, machine, onnxruntime) kept in ~/.cache/convgraph.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the error–latency front as a PNG (matplotlib).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--in-place", is_flag=True, help="Allow -o to name the input model.")
@json_option
@wide_option
@shows_progress
def optimize_command(model, calib, heldout, budget, quantile, metric, rules, ranks, shares, tensors, nodes, exclude,
                     min_macs, provider, threads, samples, image_size, mean, std, layout, input_shapes, input_values,
                     max_evals, refit, judge_all, time_budget, no_timing_cache, plot, output, in_place, as_json) -> None:
    """Rewrite MODEL's convs for speed within an error budget, fitted on calibration data (--calib)."""
    check_output_path(output, model, in_place)
    if plot:
        check_plot_path(plot, model, output)  # before the search: a bad --plot must not cost a whole run
    if not rules:
        raise UsageError("--rules is empty")
    if not ranks or min(ranks) < 1:
        raise UsageError("--ranks takes positive integers, e.g. 1,2,4")
    if max_evals < 1:
        raise UsageError("--max-evals must be at least 1")
    options = {"image_size": image_size, "mean": mean, "std": std, "layout": layout, "values": input_values or None}
    if samples is not None:
        options["samples"] = samples
    with stage("optimizing") as optimizing:
        new, report = optimize(model, calib, heldout, budget=budget, metric=metric, rules=rules, ranks=ranks,
                               shares=shares or None,
                               selection=Selection(nodes, exclude, (), min_macs), provider=provider,
                               threads=threads or None, input_shapes=input_shapes, input_options=options,
                               tensors=list(tensors) or None, max_evals=max_evals, quantile=quantile,
                               time_budget=time_budget, refit=refit, estimate_errors=not judge_all,
                               timing_cache=None if no_timing_cache else TimingCache(TimingCache.default_path()),
                               progress=optimizing.step)
    # a run that found no faster model within the budget returns the original: nothing worth writing
    written = str(write_model(new, output, input_path=model, in_place=in_place)) if report.passed else None
    if plot:
        plot_pareto(report, plot)
    if as_json:
        emit_json({**report.to_dict(), "output": written, "plot": plot})
    else:
        render(report)
        if written:
            out.print(f"wrote {written}" + (f"; plot {plot}" if plot else ""))
        elif plot:
            out.print(f"wrote plot {plot}")
    if not report.passed:
        err.print(f"convgraph: optimize: {report.reached()}; {output} not written", markup=False)
        raise click.exceptions.Exit(1)
