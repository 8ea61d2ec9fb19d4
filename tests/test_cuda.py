"""verify and bench on onnxruntime's CUDA execution provider (IO binding); skipped where it is missing (CI)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from convgraph import bench, verify
from convgraph.run.inputs import make_inputs
from convgraph.run.runtime import create_session, run
from convgraph.run.metrics import compare

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDAExecutionProvider (pip install 'convgraph[cuda]' on a GPU machine)"),
]


def test_session_really_runs_on_cuda_and_agrees_with_cpu(models_dir):
    p = models_dir / "sample.onnx"
    cuda = create_session(p, provider="cuda")
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    feeds = make_inputs(onnx.load(p), samples=1)[0]
    a, b = run(create_session(p), feeds)[0], run(cuda, feeds)[0]
    assert compare(a, b, atol=1e-3, rtol=1e-3).passed


def test_verify_on_cuda_passes_and_localizes(models_dir):
    from helpers import perturbed  # the same perturbation as the CPU tests

    p = models_dir / "sample.onnx"
    r = verify(p, p, provider="cuda", samples=2, localize=True)
    assert r.passed and r.provider == "cuda" and r.first_divergent_node is None
    r = verify(p, perturbed(onnx.load(p), "block2/pw"), provider="cuda", localize=True)
    assert not r.passed and r.first_divergent_node == "block2/pw"


def test_bench_on_cuda_uses_io_binding(models_dir):
    p = models_dir / "sample.onnx"
    r = bench([p, p], provider="cuda", runs=20, warmup=3)
    assert r.io_binding and r.provider == "cuda"
    assert all(m.median_ms > 0 and len(m.times_ms) == 20 for m in r.models)
    assert r.ratios[0].pairs == 20
    assert bench(p, provider="cuda", runs=3, warmup=0).models[0].warmup == 1  # cuDNN's search is never timed


@pytest.mark.real
def test_real_model_on_cuda(real_models):
    p = real_models("yolov8n")
    shapes = {"images": [1, 3, 320, 320]}
    r = verify(p, p, input_shapes=shapes, provider="cuda")
    assert r.passed
    b = bench(p, input_shapes=shapes, provider="cuda", runs=30, warmup=5)
    m = b.models[0]
    assert 0 < m.min_ms <= m.median_ms
    print(f"\nyolov8n 320x320 CUDA (IO binding): median {m.median_ms:.3f} ms, IQR {m.iqr_ms:.3f} ms, "
          f"session {m.session_s:.2f} s")
    assert np.isfinite(m.throughput_per_s)


def test_optimize_on_cuda_times_and_judges_there(models_dir):
    """The whole optimizer on CUDA: layers and prefixes timed with IO binding, calibration and the held-out
    judge run on the GPU; the reported metric is what the returned model gives on CPU too (TF32 off)."""
    from helpers import FAST, smooth_feeds

    from convgraph.optimize import optimize

    p = models_dir / "sample.onnx"
    calib, held = smooth_feeds(8, 2), smooth_feeds(3, 3)
    model, report = optimize(p, calib, held, budget=0.9, rules=["separable", "low-rank"], ranks=(1, 2),
                             provider="cuda", **FAST)
    assert report.provider == "cuda" and report.candidates and report.passed
    ref = [run(create_session(p), f)[0] for f in held]
    got = [run(create_session(model), f)[0] for f in held]
    assert compare(ref, got).cosine == pytest.approx(report.metric_value, abs=1e-4)
