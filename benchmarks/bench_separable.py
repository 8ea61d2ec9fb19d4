#!/usr/bin/env python
"""Rule ``separable``: MACs saved vs speed gained in onnxruntime CPU, and which rank > 1 layout is faster.

Table 1 — a stack of standard 3×3 convs (default 4 × [Conv 128→128 + bias, Relu], 28×28) rewritten
at rank 1, 2, 4 and full, in both layouts for rank > 1, all timed interleaved with the original
(``convgraph.bench``): MAC ratio (original / rewritten), latency ratio (pair median), and the share of
the MAC ratio realized as speed-up (latency ratio / MAC ratio). Criterion: rank 1 realizes ≥ 80%.

Table 2 — the two layouts of rank r > 1 (one depthwise conv with multiplier r, or the input tiled r
times into a multiplier-1 depthwise conv) on single convs of several shapes, 1D/2D/3D: the data
behind ``layout=auto`` (tiled for 2D convs with ≥ 16 depthwise channels, multiplier otherwise).

Usage: ``python benchmarks/bench_separable.py [--layers 4] [--channels 128] [--size 28] [--runs 50]
[--warmup 10] [--threads 1] [--no-layouts]``. Exits 1 when rank 1 realizes under 80% of its MAC ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chain import make_chain  # noqa: E402

from convgraph.run.bench import bench  # noqa: E402
from convgraph.engine.rewrite import rewrite  # noqa: E402
from convgraph.rules.separable import TILED_MIN_CHANNELS, layout_of  # noqa: E402

#: rank-1 criterion: share of the MAC ratio realized as speed-up
MIN_SHARE = 0.8
VARIANTS = [("1", "multiplier"), ("2", "multiplier"), ("2", "tiled"), ("4", "multiplier"), ("4", "tiled"),
            ("full", "multiplier"), ("full", "tiled")]
LAYOUT_SHAPES = [(2, 16, 56), (2, 24, 56), (2, 64, 56), (2, 128, 28), (2, 256, 14), (2, 3, 112),
                 (1, 64, 784), (1, 128, 3136), (3, 32, 16), (3, 64, 10)]


def separable(model: onnx.ModelProto, rank: str, layout: str):
    """The rewritten model and the engine's report (verification off: rank < full is approximate)."""
    return rewrite(model, ["separable"], params={"rank": rank, "layout": layout}, verify=False)


def single_conv(nd: int, channels: int, size: int, k: int = 3) -> onnx.ModelProto:
    """One k^D conv channels → channels with bias, 'same' pads, input [1, C, size^D]."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, channels, *(k,) * nd)) * 0.1).astype(np.float32)
    b = np.zeros(channels, np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k] * nd, pads=[k // 2] * 2 * nd)
    shape = [1, channels, *(size,) * nd]
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what older onnxruntime releases read too
    return model


def stack_table(args) -> tuple[Table, bool, dict]:
    original = make_chain(2 * args.layers - 1, channels=args.channels, size=args.size)
    table = Table(title=f"separable on {args.layers} × [Conv 3×3 {args.channels}→{args.channels} + Relu], "
                        f"{args.size}×{args.size}: each variant timed in {args.runs} pairs interleaved with the "
                        f"original, {args.threads} thread(s)")
    for col in ("model", "MACs (M)", "MAC ratio", "original ms", "rewritten ms", "latency ratio",
                "share of MAC ratio", "weight error"):
        table.add_column(col, justify="left" if col == "model" else "right")
    ok, env = True, {}
    for rank, layout in VARIANTS:
        res = separable(original, rank, layout)
        r = bench([original, res.model], runs=args.runs, warmup=args.warmup, threads=args.threads,
                  names=["original", "rewritten"], progress=False)
        env = r.environment
        macs0, macs = res.report.totals["macs_before"], res.report.totals["macs_after"]
        mac_ratio, ratio = macs0 / macs, r.ratios[0].median
        share = ratio / mac_ratio
        err = max(c.weight_error for c in res.report.changes)
        if rank == "1":
            ok = share >= MIN_SHARE
        table.add_row(f"rank {rank}" + ("" if rank == "1" else f", {layout}"), f"{macs / 1e6:.1f}", f"{mac_ratio:.2f}",
                      f"{r.models[0].median_ms:.3f}", f"{r.models[1].median_ms:.3f}", f"{ratio:.2f}", f"{share:.0%}",
                      f"{err:.3f}")
    return table, ok, env


def layout_table(args) -> Table:
    table = Table(title=f"rank > 1 layouts on one 3^D conv C→C ({args.runs} interleaved runs, {args.threads} thread(s))")
    for col in ("conv", "rank", "multiplier ms", "tiled ms", "tiled speed-up", "auto picks", "auto is faster"):
        table.add_column(col, justify="left" if col in ("conv", "auto picks") else "right")
    for nd, c, size in LAYOUT_SHAPES:
        model = single_conv(nd, c, size)
        for rank in (2, 4):
            mult = separable(model, str(rank), "multiplier")
            tiled = separable(model, str(rank), "tiled")
            r = bench([mult.model, tiled.model], runs=args.runs, warmup=args.warmup, threads=args.threads,
                      names=["multiplier", "tiled"], progress=False)
            speedup = r.ratios[0].median  # multiplier time / tiled time
            rec = _record(model)
            pick = layout_of(rec, rank, "auto")
            right = (pick == "tiled") == (speedup >= 1.0)
            table.add_row(f"{nd}D C={c} {'×'.join([str(size)] * nd)}", str(rank), f"{r.models[0].median_ms:.3f}",
                          f"{r.models[1].median_ms:.3f}", f"{speedup:.2f}", pick, "yes" if right else "NO")
    return table


def _record(model: onnx.ModelProto):
    import convgraph
    from convgraph.analysis.analyze import analyze

    return analyze(convgraph.load(model), rewrites=False).convs[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-layouts", action="store_true", help="only the stack table")
    args = ap.parse_args(argv)
    console = Console(width=160)
    table, ok, env = stack_table(args)
    console.print(f"onnxruntime {env['onnxruntime']} CPU; {env['cpu']} ({env['cpu_count']} cores); python {env['python']}")
    console.print(table)
    console.print(f"rank 1 realizes {'at least' if ok else 'LESS than'} {MIN_SHARE:.0%} of its MAC ratio")
    if not args.no_layouts:
        console.print(layout_table(args))
        console.print(f"layout=auto: tiled for 2D convs with ≥ {TILED_MIN_CHANNELS} depthwise channels, else multiplier")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
