#!/usr/bin/env python
"""Peak memory of convgraph's commands on models with big weights, measured with ``/usr/bin/time -v``.

Usage: ``python benchmarks/bench_big.py [--dir DIR] [--keep]``. Makes (``make_big.py``) a 0.94 GB model
with its weights inside the file (25 convs) and a 2.26 GB one past protobuf's limit with external data
(60 convs; both 1024 channels, 3×3, input 1×1024×4×4) in a temporary folder under ``--dir`` (default: the
system's), needs about 7 GB of free disk there (it checks), then runs on each: ``analyze --json``,
``rewrite --rule spatial-separable --param rank=full --nodes conv0 -o OUT`` (its checks, verification and
bench included), ``verify MODEL OUT`` and ``bench MODEL OUT --runs 5``, and prints each command's peak
resident set size, as GB and as a multiple of the weights' size, and its wall time. Deletes what it made
unless ``--keep``. Needs about 6 GB of free memory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_big import make_big  # noqa: E402

MODELS = (("0.94 GB, one file", 25, True), ("2.26 GB, external data", 60, False))


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS in GB, wall seconds, exit status) of ``cmd`` under /usr/bin/time -v."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    assert r is not None and m is not None, done.stderr
    rss = int(r.group(1))
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return rss * 1024 / 1e9, wall, done.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to make the models (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the models made")
    args = ap.parse_args(argv)
    exe = str(Path(sys.executable).with_name("convgraph"))
    tmp = Path(tempfile.mkdtemp(prefix="convgraph-big-", dir=args.dir))
    try:
        if shutil.disk_usage(tmp).free < 7e9:
            print(f"{tmp}: needs about 7 GB of free disk", file=sys.stderr)
            return 2
        print(f"{'model':<24} {'command':<9} {'peak GB':>8} {'× weights':>9} {'wall s':>7} {'exit':>4}")
        for label, convs, embedded in MODELS:
            model, out = tmp / f"big{convs}.onnx", tmp / f"big{convs}.out.onnx"
            weights = make_big(str(model), convs=convs, embedded=embedded) / 1e9
            for name, cmd in (
                    ("analyze", [exe, "analyze", "--json", str(model)]),
                    ("rewrite", [exe, "rewrite", str(model), "--rule", "spatial-separable", "--param", "rank=full",
                                 "--nodes", "conv0", "-o", str(out)]),
                    ("verify", [exe, "verify", str(model), str(out)]),
                    ("bench", [exe, "bench", str(model), str(out), "--runs", "5"])):
                gb, wall, code = measure(cmd)
                print(f"{label:<24} {name:<9} {gb:8.2f} {gb / weights:8.2f}× {wall:7.1f} {code:4d}", flush=True)
            for p in tmp.iterdir():
                if p.name.startswith(f"big{convs}.") and not args.keep:
                    p.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
