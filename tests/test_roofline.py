"""Memory cost per conv (bytes, arithmetic intensity) and the measured, cached roofline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import convgraph
from convgraph.analysis import roofline
from convgraph.analysis.analyze import analyze
from convgraph.cli import main


def test_dtype_bytes():
    assert roofline.dtype_bytes(TensorProto.FLOAT) == 4 and roofline.dtype_bytes(TensorProto.FLOAT16) == 2
    assert roofline.dtype_bytes(TensorProto.UINT8) == 1 and roofline.dtype_bytes(TensorProto.INT32) == 4
    assert roofline.dtype_bytes(TensorProto.INT4) == 0.5 and roofline.dtype_bytes(TensorProto.UINT4) == 0.5
    assert roofline.dtype_bytes(TensorProto.UNDEFINED) is None and roofline.dtype_bytes(None) is None


def _nbytes(model: onnx.ModelProto, name: str) -> int:
    return next(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name == name)


def test_bytes_and_intensity_of_float_convs(models_dir):
    path = models_dir / "sample.onnx"
    model = onnx.load(path)
    for r in analyze(convgraph.load(path)).convs:
        weights = _nbytes(model, r.weight) + (_nbytes(model, r.bias) if r.bias else 0)
        acts = 4 * (np.prod(r.input_shape) + np.prod(r.output_shape))
        assert (r.weight_bytes, r.activation_bytes) == (weights, acts), r.name
        assert r.intensity == pytest.approx(r.macs / (weights + acts))


def test_bytes_of_quantized_convs_follow_their_types(models_dir):
    """QLinearConv: uint8 activations, int8 weights, int32 bias; ConvInteger: uint8 in, int32 out."""
    path = models_dir / "quantized.onnx"
    model = onnx.load(path)
    recs = {r.op_type: r for r in analyze(convgraph.load(path)).convs}
    q = recs["QLinearConv"]
    assert q.weight_bytes == _nbytes(model, q.weight) + _nbytes(model, q.bias)
    assert q.activation_bytes == np.prod(q.input_shape) + np.prod(q.output_shape)  # one byte each
    c = recs["ConvInteger"]
    assert c.weight_bytes == _nbytes(model, c.weight)
    assert c.activation_bytes == np.prod(c.input_shape) + 4 * np.prod(c.output_shape)


def test_unknown_shapes_leave_bytes_unknown(models_dir):
    r = analyze(convgraph.load(models_dir / "dynamic.onnx")).convs[0]
    assert r.weight_bytes > 0 and r.activation_bytes is None and r.intensity is None and r.bound is None


def _roof(peak=100e9, bw=20e9) -> roofline.Roofline:
    return roofline.Roofline(peak, bw, "cpu", 1, "m", "now", "x")


def test_roofline_arithmetic():
    roof = _roof()
    assert roof.ridge == 5
    assert roof.bound(4.9) == "memory" and roof.bound(5) == "compute" and roof.bound(None) is None
    assert roof.least_ms(10**9, 10**6) == pytest.approx(10.0)  # compute: 1e9 / 1e11 s
    assert roof.least_ms(10**6, 10**9) == pytest.approx(50.0)  # memory: 1e9 / 2e10 s
    assert roof.least_ms(None, 1) is None


def test_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    said = []
    first = roofline.machine_roofline("cpu", 1, on_measure=said.append)
    assert said == [tmp_path / "convgraph" / "roofline.json"]
    assert 1e8 < first.peak_macs < 1e14 and 1e8 < first.bandwidth < 1e13  # MAC/s and bytes/s of a real machine
    again = roofline.machine_roofline("cpu", 1, on_measure=said.append)
    assert len(said) == 1 and again == first == roofline.cached_roofline("cpu", 1)
    assert roofline.cached_roofline("cpu", 2) is None  # keyed by threads
    cache = json.loads(said[0].read_text())
    assert len(cache) == 1 and "threads 1" in next(iter(cache)) and roofline.machine_id() in next(iter(cache))
    said[0].write_text("{not json")
    assert roofline.cached_roofline("cpu", 1) is None
    roofline.machine_roofline("cpu", 1, on_measure=said.append)
    assert len(said) == 2 and roofline.cached_roofline("cpu", 1) is not None


def test_analyze_json_bounds_from_the_cached_roofline(capsys, models_dir, roofline_cache):
    code = main(["analyze", str(models_dir / "sample.onnx"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    roof = roofline.cached_roofline("cpu", None)
    assert code == 0 and doc["roofline"]["peak_macs"] == roof.peak_macs and doc["roofline"]["ridge"] == roof.ridge
    for c in doc["convs"]:
        assert c["bound"] == ("compute" if c["intensity"] >= roof.ridge else "memory")
        assert c["time_ms"] is None  # not profiled


def test_static_analyze_runs_nothing_when_the_roofline_is_cached(models_dir, roofline_cache):
    """With the roofline cached, ``analyze --json`` neither imports onnxruntime nor measures anything."""
    code = ("import sys; from convgraph.cli import main; "
            f"rc = main(['analyze', '--json', {str(models_dir / 'sample.onnx')!r}]); "
            "print('ORT', 'onnxruntime' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["roofline"] is not None and r.stderr.strip() == "ORT False"


def test_analyze_table_shows_memory_and_roofline(capsys, models_dir):
    code = main(["analyze", str(models_dir / "depthwise.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "memory and time per conv" in out and "MAC/B" in out and "roofline (cpu" in out
    assert "time ms" not in out  # no profile, no time columns
