"""convgraph.bench: statistics, interleaved pairs, session timing, CLI; the timing figures live in benchmarks/."""

from __future__ import annotations

import importlib
import json

import numpy as np
import onnx
import pytest

from convgraph import bench
from convgraph.run.bench import BenchReport
from convgraph.cli import main
from convgraph.errors import ModelError, UsageError

bench_mod = importlib.import_module("convgraph.run.bench")  # convgraph.bench is the function


def test_one_model_statistics(models_dir):
    r = bench(models_dir / "sample.onnx", runs=15, warmup=2, threads=1)
    assert isinstance(r, BenchReport) and r.ratios == [] and not r.io_binding
    m = r.models[0]
    assert m.name == "sample" and m.runs == 15 and len(m.times_ms) == 15 and m.warmup == 2
    assert 0 < m.min_ms <= m.q1_ms <= m.median_ms <= m.q3_ms and m.iqr_ms == pytest.approx(m.q3_ms - m.q1_ms)
    assert m.median_ms == pytest.approx(float(np.median(m.times_ms)))
    assert m.session_s > 0 and m.batch == 1
    assert m.throughput_per_s == pytest.approx(1e3 / m.median_ms)
    assert r.environment["onnxruntime"] and r.threads == 1 and "sample" in r.summary()
    assert r.spinning  # onnxruntime's default for a single model


def test_interleaved_pairs_and_ratios(models_dir):
    p = models_dir / "sample.onnx"
    r = bench([p, p, onnx.load(models_dir / "pointwise.onnx")], runs=12, warmup=1)
    assert [m.name for m in r.models] == ["sample", "sample#2", "model3"]
    assert [x.name for x in r.ratios] == ["sample#2", "model3"] and all(x.baseline == "sample" for x in r.ratios)
    a, b = np.array(r.models[0].times_ms), np.array(r.models[1].times_ms)
    ratio = r.ratios[0]
    assert ratio.pairs == 12
    assert ratio.median == pytest.approx(float(np.median(a / b)), rel=1e-6)  # pair by pair, not median / median
    assert ratio.min <= ratio.q1 <= ratio.median <= ratio.q3 <= ratio.max
    assert not r.spinning  # interleaved sessions must not spin on each other's cores
    assert bench([p, p], runs=2, warmup=0, spinning=True).spinning


def test_names_and_inputs(models_dir, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((1, 3, 64, 64), np.float32))
    r = bench([models_dir / "sample.onnx"], names=["ref"], inputs=tmp_path / "d.npz", runs=3, warmup=0)
    assert r.models[0].name == "ref" and "d.npz" in r.inputs
    r = bench(models_dir / "dynamic.onnx", input_shapes={"x": [2, 3, 16, 16]}, runs=3, warmup=0)
    assert r.models[0].batch == 2


def test_bad_arguments(models_dir):
    p = models_dir / "sample.onnx"
    with pytest.raises(UsageError, match="--runs"):
        bench(p, runs=0)
    with pytest.raises(UsageError, match="--warmup"):
        bench(p, warmup=-1)
    with pytest.raises(UsageError, match="names"):
        bench([p, p], names=["a"])
    with pytest.raises(UsageError, match="--opt-level"):
        bench(p, opt_level="max")
    with pytest.raises(UsageError, match="--threads"):
        bench(p, threads=0)
    with pytest.raises(UsageError, match="--input-shape"):
        bench(models_dir / "dynamic.onnx")
    with pytest.raises(ModelError, match="no such file"):
        bench(models_dir / "missing.onnx")


def test_cuda_without_the_provider_is_refused(models_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match=r"pip install 'convgraph\[cuda\]'"):
        bench(models_dir / "sample.onnx", provider="cuda")


def test_cli_table_and_json(models_dir, capsys):
    p = str(models_dir / "sample.onnx")
    assert main(["bench", p, p, "--runs", "5", "--warmup", "1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "median ms" in text and "sample#2" in text and "baseline" in text
    assert main(["bench", p, str(models_dir / "standard.onnx"), "--runs", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert [m["name"] for m in doc["models"]] == ["sample", "standard"] and len(doc["models"][0]["times_ms"]) == 4
    assert doc["ratios"][0]["pairs"] == 4 and doc["provider"] == "cpu"
    assert main(["bench", str(models_dir / "dynamic.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["bench", p, "--provider", "gpu"]) == 2
