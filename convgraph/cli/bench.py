"""``convgraph bench MODEL [MODEL2 ...]``: latency with onnxruntime; several models timed interleaved."""

from __future__ import annotations

import click

from ..run.bench import BenchReport, bench
from ..run.runtime import OPT_LEVELS
from . import cli
from .common import (
    emit_json, input_data_kwargs, input_data_options, input_shape_option, json_option, out, provider_option)
from .progress import shows_progress
from .tables import Column, show, wide_option


def render(report: BenchReport) -> None:
    """The human-readable report on stdout."""
    env = report.environment
    threads = report.threads if report.threads is not None else "default"
    out.print(f"onnxruntime {env['onnxruntime']}, provider {report.provider}"
              f"{' (IO binding)' if report.io_binding else ''}, threads {threads}"
              f"{'' if report.spinning else ' (no spinning)'}, opt level {report.opt_level}; "
              f"{env['cpu']} ({env['cpu_count']} cores); inputs: {report.inputs}")
    columns = [Column("model", "name"), Column("session s", "num", drop=2), Column("median ms", "num"),
               Column("IQR ms", "num", drop=4), Column("min ms", "num", drop=3), Column("items/s", "num", drop=1),
               Column("runs", "num", drop=5)]
    if report.ratios:
        columns.append(Column(f"speed-up vs {report.models[0].name} (median [IQR] of pairs)", "num",
                              brief="speed-up [IQR]"))
    ratio_by_name = {r.name: r for r in report.ratios}
    rows = []
    for m in report.models:
        row = [m.name, f"{m.session_s:.3f}", f"{m.median_ms:.3f}", f"{m.iqr_ms:.3f}", f"{m.min_ms:.3f}",
               f"{m.throughput_per_s:.1f}", f"{m.runs} (+{m.warmup} warm-up)"]
        if report.ratios:
            r = ratio_by_name.get(m.name)
            row.append("baseline" if r is None else f"{r.median:.3f}× [{r.q1:.3f}–{r.q3:.3f}]")
        rows.append(row)
    show(columns, rows)


@cli.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model first.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's).")
@provider_option
@click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all", show_default=True,
              help="onnxruntime graph optimization level.")
@click.option("--spin/--no-spin", "spinning", default=None,
              help="onnxruntime's intra-op threads busy-wait between runs (default: only for a single model).")
@input_data_options
@input_shape_option
@json_option
@wide_option
@shows_progress
def bench_command(models, runs, warmup, threads, provider, opt_level, spinning, input_shapes, as_json, **kw) -> None:
    """Time MODEL (and MODEL2 ... interleaved with it: A B A B, ratios pair by pair) with onnxruntime."""
    data = input_data_kwargs(kw)
    data.pop("samples")  # the first sample feeds every run
    report = bench(list(models), input_shapes=input_shapes, runs=runs, warmup=warmup, provider=provider,
                   threads=threads, opt_level=opt_level, spinning=spinning, **data)
    if as_json:
        emit_json(report.to_dict())
    else:
        render(report)
