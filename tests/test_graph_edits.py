"""Editing invariants of ConvGraph.replace / to_model under random sequences of edits.

Each edit either wraps an op (the op writes fresh tensors, Identity nodes copy them to the old names: the
model computes the same) or tries a replacement that must be refused (it makes a tensor that exists, or
reads one that does not) and must leave the graph untouched. After the sequence the model passes onnx's
full check, gives onnxruntime's outputs of the original bit for bit, and loads back to the same nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import convgraph
from convgraph.errors import ConvGraphError
from convgraph.run.runtime import create_session, run


def _nodes(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


@pytest.fixture(scope="module")
def sample(models_dir):
    path = models_dir / "sample.onnx"
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    return path, x, run(create_session(path, threads=1), {"x": x})


def _wrap(cg, nid: str) -> None:
    old = cg.node(nid)
    outs = [o for o in old.output]
    fresh = [cg.unique_tensor(f"{o}/w") if o else "" for o in outs]
    node = onnx.NodeProto()
    node.CopyFrom(old)
    del node.output[:]
    node.output.extend(fresh)
    node.name = cg.unique_tensor(f"{old.name or old.op_type}/w")
    copies = [helper.make_node("Identity", [f], [o], name=cg.unique_tensor(f"{o}/copy"))
              for f, o in zip(fresh, outs) if o]
    cg.replace([nid], [node, *copies])


def _refused(cg, nid: str, kind: str) -> None:
    before = cg.to_model().SerializeToString()
    old = cg.node(nid)
    taken = next(t for n in cg.ops() for t in cg.node(n).output if t and n != nid)
    if kind == "makes an existing tensor":
        bad = helper.make_node("Identity", [old.input[0]], [taken], name="bad")
        new = [bad]
    else:
        new = [helper.make_node("Identity", ["no such tensor"], [o], name=f"bad{i}")
               for i, o in enumerate(old.output) if o]
    with pytest.raises(ConvGraphError):
        cg.replace([nid], new)
    assert cg.to_model().SerializeToString() == before


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["wrap", "wrap", "makes an existing tensor",
                                                                  "reads a missing tensor"])), max_size=6))
def test_random_edits_keep_the_model_valid_and_round_trip(sample, edits):
    path, x, expected = sample
    cg = convgraph.load(path)
    for pick, kind in edits:
        ops = sorted(n for n in cg.ops() if cg.node(n).input)
        nid = ops[pick % len(ops)]
        if kind == "wrap":
            _wrap(cg, nid)
        else:
            _refused(cg, nid, kind)
    model = cg.to_model()
    onnx.checker.check_model(model, full_check=True)
    order = cg.topological_order()
    assert [cg.node(n).name for n in order if cg.graph.nodes[n]["kind"] == "op"] == [n.name for n in model.graph.node]
    got = run(create_session(model, threads=1), {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    again = convgraph.load(model).to_model()
    assert _nodes(again) == _nodes(model)
    assert sorted(t.name for t in again.graph.initializer) == sorted(t.name for t in model.graph.initializer)
