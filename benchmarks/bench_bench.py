#!/usr/bin/env python
"""A benchmark of the bench: does ``convgraph.bench`` tell equal models apart from unequal ones?

Cases (each timed interleaved, A B A B, ratio = A's time / B's time pair by pair):

* two identical models → the median pair ratio must lie within 0.9–1.1, however noisy the machine;
* a model with one conv fewer (B) → the median pair ratio must be above 1.

Models: a synthetic chain of 3×3 convs (``make_chain``: ``--convs`` convs vs one fewer) and, when it
can be fetched, YOLOv8n at 320×320 (the same model twice; then with its costliest shape-keeping conv
replaced by an Identity).

Usage: ``python benchmarks/bench_bench.py [--runs 100] [--warmup 10] [--threads 1] [--convs 6] [--no-real]``.
Prints a table; exits 1 when a case misses its criterion.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from onnx import helper
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chain import make_chain  # noqa: E402

import convgraph  # noqa: E402
from convgraph.analysis.analyze import analyze  # noqa: E402
from convgraph.run.bench import bench  # noqa: E402


def without_costliest_conv(model: onnx.ModelProto, input_shapes: dict) -> tuple[onnx.ModelProto, str]:
    """``model`` with its costliest conv whose output has its input's shape replaced by an Identity."""
    cg = convgraph.load(model, input_shapes)
    keep = [(r.macs, r) for r in analyze(cg, rewrites=False).convs
            if not r.graph and r.macs and r.input_shape and r.input_shape == r.output_shape]
    macs, victim = max(keep, key=lambda p: p[0])
    cg.replace([victim.node_id], [helper.make_node("Identity", [victim.input], [victim.output], name=victim.node_id)])
    cg.prune_initializers()
    return cg.to_model(), f"{victim.node_id} ({macs / 1e6:.1f} M MACs)"


def cases(args) -> list[tuple[str, list, dict, str]]:
    """(case, [model A, model B], input shapes, criterion: 'equal' or 'faster')."""
    k = args.convs
    chain = make_chain(2 * k - 1, channels=32, size=56)
    shorter = make_chain(2 * (k - 1) - 1, channels=32, size=56)
    out: list[tuple[str, list, dict, str]] = [(f"chain of {k} convs, twice", [chain, chain], {}, "equal"),
           (f"chain of {k} convs vs {k - 1}", [chain, shorter], {}, "faster")]
    if not args.no_real:
        from convgraph import zoo

        try:
            yolo = onnx.load(zoo.fetch("yolov8n"))
        except zoo.DownloadError as e:
            print(f"yolov8n unavailable ({e}); real-model cases skipped", file=sys.stderr)
            return out
        shapes = {"images": [1, 3, 320, 320]}
        fewer, what = without_costliest_conv(yolo, shapes)
        print(f"yolov8n with one conv fewer: {what} replaced by an Identity", file=sys.stderr)
        out += [("yolov8n 320, twice", [yolo, yolo], shapes, "equal"),
                ("yolov8n 320 vs one conv fewer", [yolo, fewer], shapes, "faster")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--convs", type=int, default=6)
    ap.add_argument("--no-real", action="store_true", help="only the synthetic chains")
    args = ap.parse_args(argv)
    table = Table(title=f"bench of the bench: {args.runs} interleaved pairs, {args.warmup} warm-up, "
                        f"{args.threads} thread(s)")
    for col in ("case", "A median ms", "B median ms", "A IQR ms", "pair ratio A/B median", "ratio IQR",
                "criterion", "ok"):
        table.add_column(col, justify="left" if col in ("case", "criterion") else "right")
    failed = 0
    env = None
    for name, models, shapes, criterion in cases(args):
        r = bench(models, input_shapes=shapes, runs=args.runs, warmup=args.warmup, threads=args.threads,
                  names=["A", "B"], progress=False)
        env = r.environment
        a, b, ratio = r.models[0], r.models[1], r.ratios[0]
        ok = 0.9 <= ratio.median <= 1.1 if criterion == "equal" else ratio.median > 1.0
        failed += not ok
        table.add_row(name, f"{a.median_ms:.3f}", f"{b.median_ms:.3f}", f"{a.iqr_ms:.3f}", f"{ratio.median:.3f}",
                      f"{ratio.q1:.3f}–{ratio.q3:.3f}", "0.9–1.1" if criterion == "equal" else "> 1",
                      "yes" if ok else "NO")
    console = Console(width=140)
    if env:
        console.print(f"onnxruntime {env['onnxruntime']} CPU; {env['cpu']} ({env['cpu_count']} cores); "
                      f"python {env['python']}")
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
