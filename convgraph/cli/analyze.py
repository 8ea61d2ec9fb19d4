"""``convgraph analyze``: what each convolution is, costs, sees, and what a rewrite would save."""

from __future__ import annotations

from pathlib import Path

import click

from .. import report
from ..analyze import analyze as run_analysis
from ..errors import UsageError
from ..graph import gc_paused, load
from ..io import atomic_write_bytes
from . import cli, common
from .common import emit_json, input_shape_option, json_option, probe_option, warn
from .tables import Column, show, wide_option

#: How each of report.COLUMNS is drawn; at narrow widths the droppable ones go, lowest rank first.
_COLUMNS = {
    "name": Column("name", "name"), "kind": Column("kind"),
    "kernel stride dil group": Column("kernel stride dil group", "num", "left", drop=4, brief="kernel"),
    "in→out": Column("in→out", "num", "left", drop=3), "output": Column("output", "num", "left", drop=2),
    "MACs": Column("MACs", "num"), "% MACs": Column("% MACs", "num", drop=6), "params": Column("params", "num", drop=5),
    "receptive field": Column("receptive field", "num", "left", drop=1, brief="RF"), "best rewrite": Column("best rewrite", drop=7),
}


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
@wide_option
def analyze(model: Path, input_shapes: dict, as_json: bool, fmt: str | None, sort: str | None, top: int | None,
            dot_path: Path | None, probe: bool) -> None:
    """Per convolution of MODEL: kind, geometry, output shape, MACs, params, receptive field, rewrites."""
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"--json conflicts with --format {fmt}")
    fmt = "json" if as_json else (fmt or "table")
    if dot_path is not None and not dot_path.parent.exists():
        raise UsageError(f"--dot: folder {dot_path.parent} does not exist")
    if dot_path is not None and dot_path.is_dir():
        raise UsageError(f"--dot: {dot_path} is a directory")
    with gc_paused():
        cg = load(model, input_shapes, probe=probe)
        result = run_analysis(cg)
        result.model["path"] = str(model)
        for w in result.warnings:
            warn(w)
        if dot_path is not None:
            atomic_write_bytes(dot_path, report.dot(result).encode())
            common.console("err").print(f"wrote {dot_path}", markup=False, highlight=False)
        if fmt == "json":
            emit_json(result.to_dict(report.select(result.convs, sort, top)), indent=None)
        elif fmt == "markdown":
            click.echo(report.markdown(result, sort, top), nl=False)
        else:
            total = result.totals["macs"]
            show([_COLUMNS[c] for c in report.COLUMNS], [report.row(r, total) for r in report.select(result.convs, sort, top)],
                 title=f"{len(result.convs)} convolutions", hint="--wide or --format markdown shows them")
            show([Column(c, "num" if c in report.NUMERIC else "text") for c in report.KIND_COLUMNS],
                 report.kind_rows(result), title="totals by kind")
