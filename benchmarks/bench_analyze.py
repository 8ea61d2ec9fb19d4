#!/usr/bin/env python
"""Time ``convgraph analyze --json`` (the whole process) against onnx-tool's profile on long conv chains.

Usage: ``python benchmarks/bench_analyze.py [--sizes 5000,10000,20000,40000] [--repeat 1] [--no-onnx-tool]
[--symbolic]``. Each size is a model of that many nodes from :func:`make_chain.make_chain`; ``--symbolic``
also times convgraph on the same chain with its batch, height and width dynamic (MACs as formulas over N,
H, W) and reports its time against the concrete run. Both tools run in a fresh
process (import, load, shape inference, analysis/profile, output), best of ``--repeat`` runs. onnx-tool
is quadratic in the node count: its 40k-node run takes about 100 s.

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

ONNX_TOOL = """
import contextlib, io, sys
import onnx_tool
with contextlib.redirect_stdout(io.StringIO()):
    m = onnx_tool.Model(sys.argv[1])
    m.graph.shape_infer()
    m.graph.profile()
"""


def _convgraph_cmd(model: Path) -> list[str]:
    exe = Path(sys.executable).with_name("convgraph")
    if exe.exists():
        return [str(exe), "analyze", "--json", str(model)]
    return [sys.executable, "-c", "import sys; from convgraph.cli import entry; sys.argv[0] = 'convgraph'; entry()",
            "analyze", "--json", str(model)]


def bytecode_env(cache: Path) -> dict[str, str]:
    """The environment of the timed runs: compiled bytecode kept in ``cache``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def timed(cmd: list[str], repeat: int, env: "dict[str, str] | None" = None) -> tuple[float, float]:
    """Best (wall, CPU) seconds of ``repeat`` runs of ``cmd`` (stdout discarded; a failure stops the benchmark).

    CPU time (user + system of the child) is reported too: on a busy machine it is the steadier number.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000,40000", help="comma-separated node counts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and size (best is kept)")
    ap.add_argument("--no-onnx-tool", action="store_true", help="time convgraph only")
    ap.add_argument("--symbolic", action="store_true", help="also time convgraph on the chain with dynamic N, H, W")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="convgraph-bench-") as tmp:
        env = bytecode_env(Path(tmp) / "pycache")
        warm = Path(tmp) / "warm.onnx"
        onnx.save(make_chain(100), str(warm))
        timed(_convgraph_cmd(warm), 1, env)  # fills the bytecode cache (not timed)
        if not args.no_onnx_tool:
            timed([sys.executable, "-c", ONNX_TOOL, str(warm)], 1, env)
        for n in sizes:
            path = Path(tmp) / f"chain{n}.onnx"
            onnx.save(make_chain(n), str(path))
            cg = timed(_convgraph_cmd(path), args.repeat, env)
            ot = None if args.no_onnx_tool else timed([sys.executable, "-c", ONNX_TOOL, str(path)], args.repeat, env)
            sym = None
            if args.symbolic:
                onnx.save(make_chain(n, dynamic=True), str(path))
                sym = timed(_convgraph_cmd(path), args.repeat, env)
            rows.append((n, cg, ot, sym))
            os.unlink(path)
            _print(rows)
    return 0


def _print(rows) -> None:
    """Wall seconds (CPU seconds), µs of wall time per node, the wall-time speed-up, and with --symbolic the
    symbolic run's wall seconds and its ratio to the concrete run."""
    print(f"\n{'nodes':>7} | {'convgraph s (cpu)':>18} {'µs/node':>8} | {'onnx-tool s (cpu)':>18} {'µs/node':>8} | "
          f"{'speed-up':>8} | {'symbolic s':>10} {'÷ concrete':>10}")
    for n, (cw, cc), ot, sym in rows:
        line = f"{n:7d} | {cw:9.2f} ({cc:6.2f}) {1e6 * cw / n:8.0f} | "
        if ot is None:
            line += f"{'-':>18} {'-':>8} | {'-':>8}"
        else:
            ow, oc = ot
            line += f"{ow:9.2f} ({oc:6.2f}) {1e6 * ow / n:8.0f} | {ow / cw:7.1f}×"
        line += f" | {sym[0]:10.2f} {sym[0] / cw:9.2f}×" if sym is not None else f" | {'-':>10} {'-':>10}"
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
