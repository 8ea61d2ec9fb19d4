"""The benchmarks under benchmarks/ stay runnable: each imports and answers --help as a script, the cheap ones
run end to end at tiny sizes, and bench_optimize's data pipeline runs on the sample model. (mypy checks the
names they use from convgraph, lazy imports included; their figures are measured by hand, never here.)"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def _script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_every_benchmark_is_seen() -> None:
    assert {"bench_analyze", "bench_approx", "bench_bench", "bench_cuda", "bench_load", "bench_optimize",
            "bench_prune", "bench_separable", "make_chain"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_answers_help(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
    if name == "make_chain":
        return  # no options: test_make_chain_writes_the_chain runs it
    proc = _script(name, "--help", timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


def test_make_chain_writes_the_chain(tmp_path) -> None:
    proc = _script("make_chain", "11", str(tmp_path / "c.onnx"))
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(tmp_path / "c.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"] * 5 + ["Conv"]


@pytest.mark.parametrize("name, args, rows", [
    ("bench_load", ["--sizes", "40", "--repeat", "1"], ["     40 "]),
    ("bench_analyze", ["--sizes", "40", "--repeat", "1", "--no-onnx-tool", "--symbolic"], ["     40 |"]),
    ("bench_separable", ["--layers", "1", "--channels", "8", "--size", "8", "--runs", "3", "--warmup", "1"],
     ["rank 1", "layout=auto"]),
    ("bench_bench", ["--runs", "4", "--warmup", "1", "--convs", "2", "--no-real"],
     ["chain of 2 convs, twice", "chain of 2 convs vs 1"]),
    ("bench_approx", ["--only", "no row has this name"], ["| model | rule |"]),
])
def test_cheap_benchmark_runs(name: str, args: list[str], rows: list[str]) -> None:
    """At tiny sizes and a few runs the timings mean nothing, so a benchmark's own criterion may fail (exit 1,
    bench_bench and bench_separable); what must hold is that it runs through and prints its table."""
    proc = _script(name, *args)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    for row in rows:
        assert row in proc.stdout, proc.stdout


def test_bench_optimize_inputs_on_the_sample_model(models_dir, tmp_path) -> None:
    """bench_optimize's calibration crops, synthetic text pages and input sets, on the sample model: the BGR
    set is the RGB one with its channels reversed, and the model runs on every sample."""
    import bench_optimize as bo

    model = onnx.load(models_dir / "sample.onnx")
    crops = bo.crops_folder(tmp_path / "crops", bo.FIT_SOURCES[:2], 4, 64)
    bo.text_images(crops, 2, 64)
    assert len(list(crops.iterdir())) == 6
    rgb = bo.input_set(model, crops, ("x", 64, [0.5] * 3, [0.5] * 3, False, []))
    bgr = bo.input_set(model, crops, ("x", 64, [0.5] * 3, [0.5] * 3, True, []))
    assert len(rgb) == len(bgr) == 6
    for i in range(len(rgb)):
        assert rgb[i]["x"].shape == (1, 3, 64, 64)
        np.testing.assert_array_equal(bgr[i]["x"], rgb[i]["x"][:, ::-1])
    got = bo.outputs(model, list(bgr), ["logits"])
    assert [a.shape for a in got["logits"]] == [(1, 10)] * 6 and all(np.isfinite(a).all() for a in got["logits"])
