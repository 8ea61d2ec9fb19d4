#!/usr/bin/env python
"""Time ``convgraph.load`` on long conv chains: parse + checks, shape inference, graph build, by size.

For each size the model is written to a temp file and loaded from it ``--repeat`` times; the table
shows the best wall time of each step, the end-to-end ``convgraph.load`` time (best wall and its CPU
time) and µs per node, which stays flat when loading is linear. The edit columns replace every conv
by a renamed copy (one ``replace()`` per conv) and rebuild the model with ``to_model()``.

Usage: ``python benchmarks/bench_load.py [--sizes 5000,10000,20000,40000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chain import make_chain  # noqa: E402

import convgraph  # noqa: E402
from convgraph.model import graph as cgraph  # noqa: E402
from convgraph.model import loader, shapes as cshapes  # noqa: E402
from convgraph.io import read_model  # noqa: E402

T = TypeVar("T")


def _best(fn: Callable[[], T], repeat: int) -> tuple[float, float, T]:
    """(best wall seconds, CPU seconds of that run, last result) of ``repeat`` calls (at least one)."""
    times = []
    for _ in range(max(repeat, 1)):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - w0, time.process_time() - c0))
    best, cpu = min(times)
    return best, cpu, result


def _steps(path: Path, repeat: int) -> dict[str, float]:
    """Best wall time of each step of ``load``, run separately in the order (and GC setting) load runs them."""
    with cgraph.gc_paused():
        read, _, (model, origin) = _best(lambda: read_model(path), repeat)
        build, _, cg = _best(lambda: cgraph.ConvGraph(model.graph, model), repeat)
        infer, _, (inferred, _w) = _best(lambda: cshapes._infer(model, origin.size, origin.data), repeat)

        def collect():
            cg.shapes.clear()
            loader._collect_shapes(cg, inferred.graph)

        shapes, _, _ = _best(collect, repeat)
    return {"read": read, "infer": infer, "build": build, "shapes": shapes}


def _edit(cg: convgraph.ConvGraph) -> float:
    """Replace every conv by a renamed copy of itself, then rebuild the model; seconds."""
    t0 = time.perf_counter()
    for nid in list(cg.ops({"Conv"})):
        node = cg.node(nid)
        new = helper.make_node("Conv", list(node.input), list(node.output), name=f"{nid}_new", pads=[1, 1, 1, 1],
                               kernel_shape=[3, 3])
        cg.replace([nid], [new])
    model = cg.to_model()
    elapsed = time.perf_counter() - t0
    assert len(model.graph.node) == len(cg.topological_order())
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000,40000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
    head = (f"{'nodes':>7} {'MB':>6} | {'read+check':>10} {'infer':>7} {'build':>7} {'shapes':>7} | "
            f"{'load':>7} {'cpu':>7} {'µs/node':>8} | {'replace all convs + to_model':>28}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"chain{n}.onnx"
            onnx.save(make_chain(n), path)
            steps = _steps(path, args.repeat)
            wall, cpu, cg = _best(functools.partial(convgraph.load, path), args.repeat)
            edit = _edit(cg)
            print(f"{n:>7} {path.stat().st_size / 1e6:>6.1f} | {steps['read']:>9.3f}s {steps['infer']:>6.3f}s "
                  f"{steps['build']:>6.3f}s {steps['shapes']:>6.3f}s | {wall:>6.3f}s {cpu:>6.3f}s "
                  f"{wall / n * 1e6:>8.1f} | {edit:>27.3f}s")
    print("\nload = convgraph.load(path) end to end (best of --repeat); cpu = its process CPU time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
