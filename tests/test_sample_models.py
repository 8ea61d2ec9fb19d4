"""The committed sample models are valid, run in onnxruntime and are reproducible byte for byte."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

# name -> expected counts of the convolution ops in the main graph
CONV_OPS: dict[str, dict[str, int]] = {
    "standard": {"Conv": 3},
    "pointwise": {"Conv": 1},
    "depthwise": {"Conv": 2},
    "grouped": {"Conv": 2},
    "shuffle": {"Conv": 3},
    "dilated": {"Conv": 3},
    "transposed": {"ConvTranspose": 2},
    "spatial_separable": {"Conv": 4},
    "separable_block": {"Conv": 2},
    "conv1d": {"Conv": 3},
    "conv3d": {"Conv": 1},
    "conv_bn": {"Conv": 2},
    "quantized": {"QLinearConv": 1, "ConvInteger": 1},
    "constant_weights": {"Conv": 3},
    "subgraph": {"Conv": 1},
    "dynamic": {"Conv": 3},
    "sample": {"Conv": 7, "ConvTranspose": 1},
}
CONV_TYPES = ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger")


def _load(models_dir: Path, name: str) -> onnx.ModelProto:
    path = models_dir / f"{name}.onnx"
    assert path.is_file(), f"{path} is not committed; run models/make_models.py"
    return onnx.load(str(path))


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
    return nodes


def _feeds(session) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else (2 if d == "N" else 20) for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", list(CONV_OPS))
def test_sample_model_valid_and_runs(models_dir: Path, name: str) -> None:
    path = models_dir / f"{name}.onnx"
    model = _load(models_dir, name)
    onnx.checker.check_model(model, full_check=True)
    assert path.stat().st_size < 200_000
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    names = [n.name for n in _all_nodes(model.graph)]
    assert all(names) and len(set(names)) == len(names), "node names must be non-empty and unique"
    ops = Counter(n.op_type for n in model.graph.node if n.op_type in CONV_TYPES)
    assert dict(ops) == CONV_OPS[name]
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == (["logits"] if name == "sample" else ["y"])

    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, _feeds(session))
    for out, info in zip(outputs, session.get_outputs()):
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert 0.05 < float(np.abs(out).mean()) < 20, "activations should stay O(1)"
        for got, declared in zip(out.shape, info.shape):
            if isinstance(declared, int):
                assert got == declared


def test_specific_structures(models_dir: Path) -> None:
    sub = _load(models_dir, "subgraph")
    (if_node,) = [n for n in sub.graph.node if n.op_type == "If"]
    branches = {a.name: [n.op_type for n in a.g.node] for a in if_node.attribute}
    assert branches == {"then_branch": ["Conv"], "else_branch": ["Conv"]}

    dyn = _load(models_dir, "dynamic")
    dims = [d.dim_param or d.dim_value for d in dyn.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]

    const = _load(models_dir, "constant_weights")
    assert not any(i.name.endswith("W") for i in const.graph.initializer)
    assert {"Constant", "ConstantOfShape", "DequantizeLinear"} <= {n.op_type for n in const.graph.node}

    sample = _load(models_dir, "sample")
    assert [d.dim_value for d in sample.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]
    assert [d.dim_value for d in sample.graph.output[0].type.tensor_type.shape.dim] == [1, 10]


def test_readme_lists_every_model(models_dir: Path) -> None:
    readme = (models_dir / "README.md").read_text(encoding="utf-8")
    for name in CONV_OPS:
        assert f"`{name}.onnx`" in readme


def test_make_models_is_deterministic(models_dir: Path, tmp_path: Path) -> None:
    script = models_dir / "make_models.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    written = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert written == sorted(f"{n}.onnx" for n in CONV_OPS)
    for fname in written:
        assert (tmp_path / fname).read_bytes() == (models_dir / fname).read_bytes(), f"{fname} differs"
