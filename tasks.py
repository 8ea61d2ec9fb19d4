#!/usr/bin/env python3
"""Set up and run convgraph's jobs with nothing but Python 3.

    python3 tasks.py demo   # venv + install, then analyze / rewrite / verify the bundled sample model
    python3 tasks.py test   # venv + install with test extras, ruff and mypy, then the test suite

The virtual environment lives in .venv; it is (re)installed when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def run(*cmd: str | os.PathLike, check: bool = True) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code and check:
        sys.exit(code)


def setup(extras: str) -> None:
    """Create .venv and install convgraph (editable) with ``extras`` unless already done for this pyproject."""
    if not PY.exists():
        venv.create(VENV, with_pip=True)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / ".convgraph-installed"
    if not stamp.exists() or stamp.read_text() != want:
        run(PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".[{extras}]")
        stamp.write_text(want)


def demo() -> None:
    """The main job on the bundled sample: what its convs cost, an exact rewrite, and its proof."""
    setup("cpu")
    cg = BIN / "convgraph"
    (ROOT / "out").mkdir(exist_ok=True)
    run(cg, "analyze", "models/sample.onnx")
    run(cg, "rewrite", "models/sample.onnx", "--rule", "fold-bn", "--rule", "separable", "--param", "rank=full",
        "--threads", "1", "-o", "out/sample.separable.onnx")
    run(cg, "verify", "models/sample.onnx", "out/sample.separable.onnx", "--samples", "4", "--localize")


def test() -> None:
    setup("cpu,test")
    # lint and types first: cheap, and what they find is cheaper to read than a failing test
    run(PY, "-m", "ruff", "check", ".")  # the whole tree: library, rules, tests, benchmarks, models, this file
    run(PY, "-m", "mypy")  # the files pyproject.toml's [tool.mypy] names: the same tree
    # fetch the real models once; without a network the tests that need them skip, the rest still run
    run(PY, "-m", "convgraph.zoo", check=False)
    run(PY, "-m", "pytest", "-q", *sys.argv[2:])


if __name__ == "__main__":
    jobs = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in jobs:
        sys.exit(f"usage: python3 tasks.py {{{'|'.join(jobs)}}} [pytest args]")
    jobs[sys.argv[1]]()
