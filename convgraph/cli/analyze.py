"""``convgraph analyze``: what each convolution is, costs, sees, and what a rewrite would save."""

from __future__ import annotations

from pathlib import Path

import click

from ..analysis import report
from ..analysis.analyze import analyze as run_analysis
from ..errors import UsageError
from ..model.graph import gc_paused
from ..model.loader import load
from ..io import check_output_path, write_output
from . import cli, common
from .common import (emit_json, input_data_kwargs, input_data_options, input_shape_option, json_option, probe_option,
                     provider_option, warn)
from .tables import Column, show, wide_option

#: How each of report.COLUMNS is drawn; at narrow widths the droppable ones go, lowest rank first.
_COLUMNS = {
    "name": Column("name", "name"), "kind": Column("kind"),
    "kernel stride dil group": Column("kernel stride dil group", "num", "left", drop=4, brief="kernel"),
    "in→out": Column("in→out", "num", "left", drop=3), "output": Column("output", "num", "left", drop=2),
    "MACs": Column("MACs", "num"), "% MACs": Column("% MACs", "num", drop=6), "params": Column("params", "num", drop=5),
    "receptive field": Column("receptive field", "num", "left", drop=1, brief="RF"), "best rewrite": Column("best rewrite", drop=7),
}
#: The memory/time table's columns (report.COST_COLUMNS, then report.TIME_COLUMNS when profiled).
_COST = {
    "name": Column("name", "name"), "kind": Column("kind", drop=3), "% MACs": Column("% MACs", "num", drop=2),
    "weights": Column("weights", "num"), "activations": Column("activations", "num", brief="acts"),
    "MAC/B": Column("MAC/B", "num"), "bound": Column("bound"), "time ms": Column("time ms", "num"),
    "% time": Column("% time", "num"), "reorder ms": Column("reorder ms", "num", drop=1, brief="reorder"),
    "GMAC/s": Column("GMAC/s", "num", drop=4), "× roofline": Column("× roofline", "num", drop=5, brief="×roof"),
}

#: The totals-by-kind table's columns (report.KIND_COLUMNS): with formulas for MACs (dynamic input sizes) the two
#: MACs columns alone are wider than 80 columns, so the one with the bias goes first.
_KIND = {
    "kind": Column("kind"), "convs": Column("convs", "num"), "MACs": Column("MACs", "num"),
    "% MACs": Column("% MACs", "num", drop=3), "MACs + bias": Column("MACs + bias", "num", drop=1),
    "params": Column("params", "num", drop=2),
}


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@input_shape_option
@json_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default=None,
              help="Output format (default: table; --json is --format json).")
@click.option("--sort", type=click.Choice(report.SORT_KEYS), default=None,
              help="Order of the convs (default: model order; macs, params and time largest first).")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only the first N convs (totals stay whole).")
@click.option("--dot", "dot_path", type=click.Path(path_type=Path), default=None, metavar="OUT.dot",
              help="Also write the graph as Graphviz DOT, convs coloured by kind (by time share with --profile).")
@probe_option
@click.option("--profile", "profiled", is_flag=True,
              help="Run the model under onnxruntime's profiler and give each conv its measured time.")
@click.option("--runs", type=int, default=20, show_default=True, help="--profile: timed runs.")
@click.option("--warmup", type=int, default=3, show_default=True, help="--profile: warm-up runs.")
@click.option("--threads", type=int, default=None,
              help="onnxruntime intra-op threads for --profile and the roofline (default: onnxruntime's).")
@provider_option
@input_data_options
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, metavar="OUT.png",
              help="Also draw the top convs (--top, default 20) by measured time beside their MAC share (implies --profile; "
                   "matplotlib).")
@wide_option
def analyze(model: Path, input_shapes: dict, input_values: dict, as_json: bool, fmt: str | None, sort: str | None, top: int | None,
            dot_path: Path | None, probe: bool, profiled: bool, runs: int, warmup: int, threads: int | None,
            provider: str, plot_path: Path | None, **kw) -> None:
    """Per convolution of MODEL: kind, geometry, output shape, MACs, params, receptive field, rewrites, memory
    cost and its bound on this machine's roofline; with --profile, the time each conv takes.

    Dynamic input dims left unset are symbols: shapes and MACs are then formulas over them.
    """
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json conflicts with --format {fmt}")
    fmt = "json" if as_json else (fmt or "table")
    data = input_data_kwargs(kw)
    profiled = profiled or plot_path is not None
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if sort == "time" and not profiled:
        raise UsageError("--sort time needs measured times: add --profile")
    for flag, path in (("--dot", dot_path), ("--plot", plot_path)):
        if path is not None:
            check_output_path(path, model, flag=flag)
    if plot_path is not None:
        from ..analysis.profile import pyplot

        pyplot()  # before any work: a missing matplotlib fails at once
    with gc_paused():
        cg = load(model, input_shapes, probe=probe, input_values=input_values)
        result = run_analysis(cg)
        result.model["path"] = str(model)
        _measure(cg, result, profiled, provider, threads, runs, warmup, data)
        for w in result.warnings:
            warn(w)
        if plot_path is not None:
            from ..analysis.profile import plot

            plot(result, plot_path, top or 20)
            common.console("err").print(f"wrote {plot_path}", markup=False, highlight=False)
        if dot_path is not None:
            write_output(dot_path, report.dot(result), model, flag="--dot")
            common.console("err").print(f"wrote {dot_path}", markup=False, highlight=False)
        if fmt == "json":
            emit_json(result.to_dict(report.select(result.convs, sort, top, report.reference(result))), indent=None)
        elif fmt == "markdown":
            click.echo(common.printable(report.markdown(result, sort, top), newlines=True), nl=False)
            click.echo(common.printable("\n" + report.cost_markdown(result, sort, top), newlines=True), nl=False)
        else:
            values = report.reference(result)
            show([_COLUMNS[c] for c in report.COLUMNS], [report.row(r, report.total_macs(result), values)
                                                        for r in report.select(result.convs, sort, top, values)],
                 title=f"{len(result.convs)} convolutions", hint="--wide or --format markdown shows them")
            note = report.reference_note(result, sort)
            if note:
                common.console("out").print(note, markup=False, highlight=False)
            columns, rows = report.cost_rows(result, sort, top)
            show([_COST[c] for c in columns], rows, title="memory and time per conv",
                 hint="--wide or --format markdown shows them")
            for line in report.cost_notes(result):
                common.console("out").print(line, markup=False)
            show([_KIND[c] for c in report.KIND_COLUMNS], report.kind_rows(result), title="totals by kind")


def _measure(cg, result, profiled: bool, provider: str, threads: int | None, runs: int, warmup: int,
             data: dict) -> None:
    """The roofline (cached, else measured once) and, with --profile, each conv's measured time."""
    from ..analysis import roofline

    roof = roofline.cached_roofline(provider, threads)  # no onnxruntime needed when cached
    if roof is None:
        try:
            roof = roofline.machine_roofline(provider, threads, on_measure=lambda path: common.console("err").print(
                f"measuring this machine's roofline once ({provider}; cached in {path})", markup=False,
                highlight=False))
        except UsageError:
            if profiled or provider != "cpu":
                raise
            roof = None  # no onnxruntime: the static analysis goes on, bounds unknown
    roofline.apply(result.convs, roof)
    result.roofline = roof
    if profiled:
        from ..analysis.profile import attach, profile

        prof = profile(cg, data.pop("inputs"), input_shapes=cg.input_shapes or None, seed=data.pop("seed"),
                       provider=provider, threads=threads, runs=runs, warmup=warmup,
                       input_options={**data, "values": cg.input_values or None})
        attach(result, prof, roof)
        result.warnings.extend(prof.warnings())
