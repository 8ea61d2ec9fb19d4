"""``convgraph analyze``: what each convolution is, costs, sees, and what a rewrite would save."""

from __future__ import annotations

from pathlib import Path

import click

from .. import report
from ..analyze import analyze as run_analysis
from ..errors import UsageError
from ..graph import gc_paused, load
from ..io import check_output_path, write_output
from . import cli, common
from .common import emit_json, input_shape_option, json_option, probe_option, warn


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@input_shape_option
@json_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default=None,
              help="Output format (default: table; --json is --format json).")
@click.option("--sort", type=click.Choice(report.SORT_KEYS), default=None,
              help="Order of the convs (default: model order; macs and params largest first).")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only the first N convs (totals stay whole).")
@click.option("--dot", "dot_path", type=click.Path(path_type=Path), default=None, metavar="OUT.dot",
              help="Also write the graph as Graphviz DOT, convs coloured by kind.")
@probe_option
def analyze(model: Path, input_shapes: dict, as_json: bool, fmt: str | None, sort: str | None, top: int | None,
            dot_path: Path | None, probe: bool) -> None:
    """Per convolution of MODEL: kind, geometry, output shape, MACs, params, receptive field, rewrites."""
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json conflicts with --format {fmt}")
    fmt = "json" if as_json else (fmt or "table")
    if dot_path is not None:
        check_output_path(dot_path, model, flag="--dot")
    with gc_paused():
        cg = load(model, input_shapes, probe=probe)
        result = run_analysis(cg)
        result.model["path"] = str(model)
        for w in result.warnings:
            warn(w)
        if dot_path is not None:
            write_output(dot_path, report.dot(result), model, flag="--dot")
            common.console("err").print(f"wrote {dot_path}", markup=False, highlight=False)
        if fmt == "json":
            emit_json(result.to_dict(report.select(result.convs, sort, top)), indent=None)
        elif fmt == "markdown":
            click.echo(report.markdown(result, sort, top), nl=False)
        else:
            convs, kinds = report.tables(result, sort, top)
            common.console("out").print(convs)
            common.console("out").print(kinds)
