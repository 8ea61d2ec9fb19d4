#!/usr/bin/env python
"""Time ``convgraph analyze --json`` against onnx-tool's profile on long conv chains, each as a whole process.

Usage: ``python benchmarks/bench_analyze.py [--sizes 5000,10000,20000,40000] [--repeat 1] [--no-onnx-tool]
[--symbolic]``. Each size is a model of that many nodes from :func:`make_chain.make_chain`; ``--symbolic``
also times convgraph on the same chain with its batch, height and width dynamic (MACs as formulas over N,
H, W) and reports its time against the concrete run. Both tools run in a fresh process (interpreter
start, imports, load, shape inference, analysis/profile, output): the speed-up is the ratio of those
whole-process wall times; the CPU time (user + system) of each process is reported beside it, the
steadier number on a busy machine. Each process also reports its in-process time (load to output,
after its imports), so the cost of starting is visible: the whole-process figure is the one a user waits
for. Runs of the two tools are interleaved (convgraph, onnx-tool, convgraph, ...), best of ``--repeat``
each, so that load from other jobs falls on both alike. onnx-tool is quadratic in the node count: its
40k-node run takes about 100 s.

Both run with compiled bytecode, as after a ``pip install``: a bytecode cache in a temporary folder
(``PYTHONPYCACHEPREFIX``), filled by one untimed run of each tool first. Otherwise, with
``PYTHONDONTWRITEBYTECODE`` set (as in some sandboxes and CI), an editable convgraph would recompile its
modules on every run while onnx-tool, installed with its ``.pyc`` files, would not.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chain import make_chain  # noqa: E402

#: Each child prints its in-process seconds (after its imports) as the last line of stderr.
ONNX_TOOL = """
import contextlib, io, sys, time
import onnx_tool
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    m = onnx_tool.Model(sys.argv[1])
    m.graph.shape_infer()
    m.graph.profile()
print(time.perf_counter() - start, file=sys.stderr)
"""

CONVGRAPH = """
import sys, time
from convgraph.cli import main
start = time.perf_counter()
code = main(["analyze", "--json", sys.argv[1]])
sys.stdout.flush()
print(time.perf_counter() - start, file=sys.stderr)
sys.exit(code)
"""


def bytecode_env(cache: Path) -> dict[str, str]:
    """The environment of the timed runs: compiled bytecode kept in ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


class Timing:
    """Best whole-process wall, CPU (user + system of the child) and in-process seconds over the runs."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.inner = float("inf")

    def run(self, cmd: list[str], env: "dict[str, str] | None" = None) -> "Timing":
        """Run ``cmd`` once (stdout discarded; a failure stops the benchmark) and keep the best times."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        inner = float(done.stderr.strip().splitlines()[-1])
        self.wall, self.cpu, self.inner = min(self.wall, wall), min(self.cpu, cpu), min(self.inner, inner)
        return self


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000,40000", help="comma-separated node counts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and size, interleaved (best is kept)")
    ap.add_argument("--no-onnx-tool", action="store_true", help="time convgraph only")
    ap.add_argument("--symbolic", action="store_true", help="also time convgraph on the chain with dynamic N, H, W")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    convgraph = [sys.executable, "-c", CONVGRAPH]
    onnx_tool = [sys.executable, "-c", ONNX_TOOL]
    rows = []
    with tempfile.TemporaryDirectory(prefix="convgraph-bench-") as tmp:
        env = bytecode_env(Path(tmp) / "pycache")
        warm = Path(tmp) / "warm.onnx"
        onnx.save(make_chain(100), str(warm))
        Timing().run([*convgraph, str(warm)], env)  # fills the bytecode cache (not timed)
        if not args.no_onnx_tool:
            Timing().run([*onnx_tool, str(warm)], env)
        for n in sizes:
            path, dyn = Path(tmp) / f"chain{n}.onnx", Path(tmp) / f"chain{n}-dynamic.onnx"
            onnx.save(make_chain(n), str(path))
            if args.symbolic:
                onnx.save(make_chain(n, dynamic=True), str(dyn))
            cg, ot, sym = Timing(), None if args.no_onnx_tool else Timing(), Timing() if args.symbolic else None
            for _ in range(args.repeat):
                cg.run([*convgraph, str(path)], env)
                if ot is not None:
                    ot.run([*onnx_tool, str(path)], env)
                if sym is not None:
                    sym.run([*convgraph, str(dyn)], env)
            rows.append((n, cg, ot, sym))
            for p in (path, dyn):
                if p.exists():
                    os.unlink(p)
            _print(rows)
    return 0


def _print(rows) -> None:
    """Per tool: whole-process wall seconds (CPU seconds) and in-process seconds; the whole-process wall-time
    speed-up (and the CPU-time one); with --symbolic the symbolic run's wall seconds and its ratio to the
    concrete run."""
    print(f"\n{'nodes':>7} | {'convgraph s (cpu) in-proc':>25} | {'onnx-tool s (cpu) in-proc':>25} | "
          f"{'speed-up (cpu)':>14} | {'symbolic s':>10} {'÷ concrete':>10}")
    for n, cg, ot, sym in rows:
        line = f"{n:7d} | {cg.wall:8.2f} ({cg.cpu:6.2f}) {cg.inner:7.2f} | "
        if ot is None:
            line += f"{'-':>25} | {'-':>14}"
        else:
            line += f"{ot.wall:8.2f} ({ot.cpu:6.2f}) {ot.inner:7.2f} | {ot.wall / cg.wall:5.1f}× ({ot.cpu / cg.cpu:5.1f}×)"
        line += f" | {sym.wall:10.2f} {sym.wall / cg.wall:9.2f}×" if sym is not None else f" | {'-':>10} {'-':>10}"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
