"""Round trip: ``convgraph.load(p).to_model()`` computes bitwise what the original computes under onnxruntime.

Covers every model of onnx's bundled backend test data that onnxruntime can run (with the shipped
``test_data_set_0`` inputs), the ``light/`` model-zoo architectures (with the inputs onnx's backend
runner generates for them, checked against the shipped ``light_*_output_0.pb``) and the real trained
models. The round trip must also pass ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import convgraph
from helpers import BACKEND, LIGHT, REAL, cpu_session, graph_inputs, light_inputs, original_run, shipped_inputs

#: Backend models onnxruntime 1.32 runs here: 100 of 140 (the rest fail in onnxruntime itself: opset-1/6
#: kernels it dropped, the training domain, and 4 StringNormalizer models on machines without the
#: en_US.UTF-8 locale, which run where it is installed).
MIN_BACKEND_RUNNABLE = 100


def _bits(value) -> list[tuple | None]:
    """A run output as comparable bits: dtype, shape and bytes of every array inside it."""
    if isinstance(value, list):
        return [b for v in value for b in _bits(v)]
    if value is None:
        return [None]
    a = np.asarray(value)
    if a.dtype == object:
        return [(a.dtype.str, a.shape, tuple(a.ravel().tolist()))]
    return [(a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes())]


def _load(source, input_shapes=None) -> convgraph.ConvGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
        return convgraph.load(source, input_shapes)


def _assert_same_outputs(original: bytes, roundtrip: onnx.ModelProto, feeds: dict, expected=None) -> None:
    a = expected if expected is not None else cpu_session(original).run(None, feeds)
    b = cpu_session(roundtrip.SerializeToString()).run(None, feeds)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert _bits(x) == _bits(y), f"output {i} differs after the round trip"


def _id(p: Path) -> str:
    return f"{p.parent.parent.name}/{p.parent.name}" if p.name == "model.onnx" else p.stem


@pytest.mark.parametrize("path", BACKEND, ids=_id)
def test_backend_model_round_trip(path: Path) -> None:
    roundtrip = _load(path).to_model()
    onnx.checker.check_model(roundtrip, full_check=True)
    assert roundtrip.SerializeToString() == onnx.load(path).SerializeToString()
    runs, result = original_run(str(path))
    if not runs:
        with pytest.raises(Exception) as e:  # the round trip fails in onnxruntime exactly as the original
            model = onnx.load(path)
            cpu_session(roundtrip.SerializeToString()).run(None, shipped_inputs(path, model))
        assert str(e.value).strip().splitlines()[0] == result
        pytest.skip(f"onnxruntime cannot run the original: {result[:120]}")
    _assert_same_outputs(path.read_bytes(), roundtrip, shipped_inputs(path, onnx.load(path)), expected=result)


def test_backend_runnable_count() -> None:
    runnable = [p for p in BACKEND if original_run(str(p))[0]]
    assert len(BACKEND) == 140
    assert len(runnable) >= MIN_BACKEND_RUNNABLE, f"only {len(runnable)} of {len(BACKEND)} backend models run"


@pytest.mark.parametrize("path", LIGHT, ids=_id)
def test_light_model_round_trip(path: Path) -> None:
    """Model-zoo architectures (IR 3, ConstantOfShape weights, initializers listed as inputs)."""
    roundtrip = _load(path).to_model()
    onnx.checker.check_model(roundtrip, full_check=True)
    runs, result = original_run(str(path))
    assert runs, result
    expected = numpy_helper.to_array(onnx.load_tensor(str(path.with_name(path.stem + "_output_0.pb"))))
    np.testing.assert_allclose(result[0], expected, rtol=1e-3, atol=1e-7)  # the inputs are the runner's
    _assert_same_outputs(path.read_bytes(), roundtrip, light_inputs(onnx.load(path)), expected=result)


def test_light_models_are_all_there() -> None:
    assert len(LIGHT) == 9


SAMPLES = sorted((Path(__file__).resolve().parent.parent / "models").glob("*.onnx"))


def _sample_feeds(model: onnx.ModelProto) -> dict:
    """Random inputs for a sample model: a symbolic batch dim becomes 1, other symbolic dims 16."""
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 16) for i, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_sample_model_round_trip(path: Path) -> None:
    model = onnx.load(path)
    roundtrip = _load(path).to_model()
    onnx.checker.check_model(roundtrip, full_check=True)
    assert roundtrip.SerializeToString() == model.SerializeToString()
    _assert_same_outputs(path.read_bytes(), roundtrip, _sample_feeds(model))


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_round_trip(name: str, real_models) -> None:
    path = real_models(name)
    shapes = REAL[name]
    cg = _load(path, shapes)
    roundtrip = cg.to_model()
    onnx.checker.check_model(roundtrip, full_check=True)
    assert roundtrip.SerializeToString() == onnx.load(path).SerializeToString()
    assert not [w for w in cg.warnings if "dynamic" in w]  # the given shapes fix every dynamic dim
    rng = np.random.default_rng(0)
    feeds = {k: rng.random(v, dtype=np.float32) for k, v in shapes.items()}
    _assert_same_outputs(path.read_bytes(), roundtrip, feeds)
