"""The error–latency plot of an optimize report (matplotlib, Agg)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import UsageError
from ..io import atomic_write_bytes, check_output_path
from ..analysis.profile import pyplot
from .report import OptimizeReport


# ---- the plot --------------------------------------------------------------------------------------------------
def check_plot_path(path, model=None, output=None) -> Path:
    """Refuse (UsageError) a plot path before any work: matplotlib missing, a format it cannot write, the
    input model or the output model, a folder or a missing folder (:func:`convgraph.io.check_output_path`)."""
    p = Path(os.fspath(path))
    for other, what in ((model, "the input model"), (output, "the output model")):
        if other is not None and p.resolve() == Path(os.fspath(other)).resolve():
            raise UsageError(f"--plot {p} is {what}; give the plot a file of its own")
    check_output_path(p, model)  # also a hard link to the input, a folder, a missing folder
    fmt = p.suffix[1:].lower()
    pyplot()
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if fmt not in formats:
        raise UsageError(f"--plot {p}: matplotlib cannot write {'.' + fmt if fmt else 'files without an extension'}; "
                         f"name a .png (or {', '.join('.' + f for f in sorted(formats) if f != 'png')})")
    return p


def plot_pareto(report: OptimizeReport, path) -> None:
    """A picture of the error–latency front (format from the file's extension, written atomically): the
    greedy sequence as predicted, and the prefixes as measured."""
    path = check_plot_path(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = 1e-6
    if report.sequence:
        xs = [0.0] + [s.predicted_error for s in report.sequence]
        first = report.sequence[0]
        ys = [first.predicted_ms + first.saving_ms] + [s.predicted_ms for s in report.sequence]
        ax.plot([max(x, floor) for x in xs], ys, "-", color="0.6", label="greedy sequence (predicted)")
    pts = report.points
    if pts:
        ax.scatter([max(p.error, floor) for p in pts], [p.measured_ms for p in pts],
                   c=["tab:green" if p.passed else "tab:red" for p in pts], zorder=3,
                   label="built and measured (green: within budget)")
        for p in pts:
            ax.annotate(str(p.steps), (max(p.error, floor), p.measured_ms), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.scatter([floor], [report.baseline_ms], marker="s", color="k", zorder=3, label="original")
    allowed = {"cosine": 1 - report.budget, "snr": 10 ** (-report.budget / 10)}.get(report.metric)
    if allowed:
        ax.axvline(max(allowed, floor), color="tab:blue", ls="--", lw=1,
                   label=f"budget ({report.metric} {report.budget:g})")
    ax.set_xscale("log")
    ax.set_xlabel("model output error (1 − cosine)" if report.metric != "snr" else "noise / signal power")
    ax.set_ylabel(f"latency, ms ({report.provider}, {report.threads or 'default'} thread(s))")
    ax.set_title(f"{report.model.rsplit('/', 1)[-1]}: error vs latency")
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower())
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
