"""convgraph.model.shapes: the shape helpers split out of convgraph.model.graph, and shapes measured with onnxruntime
(``probe_shapes``, ``load(..., probe=True)``, ``convgraph analyze --probe``) where onnx's inference gives up."""

from __future__ import annotations

import json
import math
import sys

import onnx
import pytest

import convgraph
import convgraph.model.graph
import convgraph.run.runtime
import convgraph.model.shapes
from convgraph.analysis.analyze import analyze
from convgraph.errors import UsageError
from convgraph.errors import ConvGraphWarning
from convgraph.model.loader import load
from convgraph.run.inputs import input_specs, random_inputs
from convgraph.model.probe import probe_shapes, unknown_tensors
from helpers import F, computed_reshape, run_cli, write_model

pytestmark = pytest.mark.filterwarnings("ignore::convgraph.errors.ConvGraphWarning")

REC_SHAPE = {"x": [1, 3, 48, 320]}


def _one_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("convgraph: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- the split ------------------------------------------------------------------------------------
def test_the_package_exports_tensor_info() -> None:
    assert convgraph.TensorInfo is convgraph.model.shapes.TensorInfo


# ---- a synthetic model onnx cannot follow ---------------------------------------------------------
def test_inference_gives_up_on_a_computed_reshape_target() -> None:
    cg = load(computed_reshape())
    assert cg.shape("c") == (1, 4, 8, 8) and cg.shape("r") is None and cg.measured == set()
    assert "r" in unknown_tensors(cg) and "c" not in unknown_tensors(cg)
    rec = analyze(cg, rewrites=False).record("conv2")
    assert rec.macs is None and rec.input_shape is None and rec.shape_source == "inferred"


def test_probe_measures_and_fills_the_shape_table() -> None:
    cg = load(computed_reshape())
    got = probe_shapes(cg)
    assert got["r"] == (1, 4, 1, 64) and got["y"] == (1, 5, 1, 64)
    assert set(got) == set(cg.measured) and "c" not in got  # only what inference left unknown
    assert cg.shape_info("r") == convgraph.TensorInfo(F, (1, 4, 1, 64)) and cg.shape_measured("r")
    G = cg.graph  # the edges carry the measured info too
    assert G.edges["reshape", "conv2", ("r", 0)]["info"].shape == (1, 4, 1, 64)
    assert any("ran the model once on generated inputs (x [1,3,8,8]; seed 0)" in w for w in cg.warnings)
    assert unknown_tensors(cg) == []
    rec = analyze(cg, rewrites=False)
    conv2, conv = rec.record("conv2"), rec.record("conv")
    assert conv2.input_shape == (1, 4, 1, 64) and conv2.output_shape == (1, 5, 1, 64)
    assert conv2.macs == 5 * 64 * 4 * 3 and conv2.shape_source == "measured"  # out elements × C_in × k
    assert conv.shape_source == "inferred" and conv.macs == 4 * 64 * 3 * 9
    assert not any("unknown MACs" in w for w in rec.warnings)
    from convgraph.analysis.report import row  # the table says which shapes were measured

    assert row(conv2, None)[4] == "1×5×1×64 (measured)" and row(conv, None)[4] == "1×4×8×8"


def test_probe_named_tensors_only() -> None:
    cg = load(computed_reshape())
    assert probe_shapes(cg, ["r", "r"]) == {"r": (1, 4, 1, 64)}
    assert cg.measured == {"r"} and cg.shape("y") != (1, 5, 1, 64)
    with pytest.raises(UsageError, match="no such tensor"):
        probe_shapes(cg, ["nope"])


def test_subgraph_tensors_cannot_be_exposed() -> None:
    cg = load(computed_reshape(body=True))
    with pytest.raises(UsageError, match="inside the subgraph /if:then_branch: onnxruntime can only expose main-graph"):
        probe_shapes(cg, ["then_y"])
    probe_shapes(cg)
    body = cg.graph.nodes["if"]["subgraphs"]["then_branch"]
    assert body.shape("r") == (1, 4, 1, 64) and body.shape_measured("r")  # read through the outer capture
    warning = next(w for w in cg.warnings if "--probe ran the model" in w)
    assert "inside If/Loop/Scan bodies keep unknown shapes" in warning
    rec = analyze(cg, rewrites=False).record("then/conv", "/if:then_branch")
    assert rec.shape_source == "measured" and rec.macs == 2 * 64 * 4  # its output shape computed from the input


def test_data_dependent_shapes_are_said_to_hold_for_that_input_only() -> None:
    cg = load(computed_reshape(nonzero=True))
    got = probe_shapes(cg, seed=3)
    assert got["nz"][0] == 4  # NonZero of a 4-D tensor: 4 × number of non-zeros
    warning = next(w for w in cg.warnings if "--probe ran the model" in w)
    assert "seed 3" in warning and "holds for this generated input only (this model has NonZero)" in warning


def test_probe_is_a_no_op_when_every_shape_is_known(monkeypatch, models_dir, capsys) -> None:
    def no_session(*a, **k):
        raise AssertionError("a session was created")

    monkeypatch.setattr(convgraph.run.runtime, "create_session", no_session)
    cg = load(models_dir / "sample.onnx")
    assert probe_shapes(cg) == {} and cg.measured == set() and cg.warnings == []
    code, out, err = run_cli(capsys, "analyze", models_dir / "sample.onnx", "--probe", "--json")
    assert code == 0 and err == "", err
    assert {c["shape_source"] for c in json.loads(out)["convs"]} == {"inferred"}


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_hint_then_probe(tmp_path, capsys) -> None:
    path = write_model(tmp_path, computed_reshape())
    code, out, err = run_cli(capsys, "analyze", path, "--json")
    assert code == 0
    hint = [line for line in err.splitlines() if "unknown MACs" in line]
    assert len(hint) == 1 and "conv2" in hint[0], err
    assert hint[0].endswith("--probe (convgraph.load(..., probe=True)) runs the model once on generated inputs to measure them")
    assert next(c for c in json.loads(out)["convs"] if c["name"] == "conv2")["macs"] is None
    code, out, err = run_cli(capsys, "analyze", path, "--json", "--probe")
    assert code == 0 and "unknown MACs" not in err and "--probe ran the model" in err
    convs = {c["name"]: c for c in json.loads(out)["convs"]}
    assert convs["conv2"]["macs"] == 3840 and convs["conv2"]["shape_source"] == "measured"
    assert convs["conv"]["shape_source"] == "inferred"


def test_cli_probe_needs_fixed_inputs(tmp_path, capsys) -> None:
    path = write_model(tmp_path, computed_reshape(dynamic=True))
    code, out, err = run_cli(capsys, "analyze", path, "--probe")
    _one_error(code, err, "--probe runs the model", "x [N,3,H,W]", "--input-shape x=?,3,?,?")
    assert out == ""
    code, out, err = run_cli(capsys, "analyze", path, "--probe", "--json", "--input-shape", "x=1,3,8,6")
    assert code == 0, err
    conv2 = next(c for c in json.loads(out)["convs"] if c["name"] == "conv2")
    assert conv2["output_shape"] == [1, 5, 1, 48] and conv2["macs"] == 5 * 48 * 4 * 3


def test_cli_probe_without_onnxruntime(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    path = write_model(tmp_path, computed_reshape())
    code, out, err = run_cli(capsys, "analyze", path, "--probe", "--json")
    _one_error(code, err, "--probe", "onnxruntime is not installed", "pip install 'convgraph[cpu]'")
    assert json.loads(out)["exit_code"] == 2  # --json: the error as the one document


# ---- PP-OCR rec: a real model where onnx's inference gives up ------------------------------------------
@pytest.mark.real
def test_ppocr_rec_every_conv_gets_shapes_and_macs(real_models) -> None:
    """The 3 convs behind a computed Reshape (Shape → Cast → Slice → Concat) that onnx's inference loses get
    their shapes statically, equal to what running the model measures."""
    path = real_models("ppocr-rec")
    static = analyze(load(path, REC_SHAPE), rewrites=False)
    assert all(r.macs is not None and r.macs_bias is not None for r in static) and len(static) == 38
    assert not any("unknown MACs" in w for w in static.warnings)
    lost = [static.record(n) for n in ("p2o.Conv.35", "p2o.Conv.36", "p2o.Conv.37")]
    model = onnx.load(path)
    feed = random_inputs(input_specs(model), input_shapes=REC_SHAPE)[0]
    got = convgraph.run.runtime.run_with_outputs(model, [r.output for r in lost], [feed])
    for r in lost:
        assert r.output_shape == got[r.output][0].shape
        assert r.macs == math.prod(r.output_shape) * (r.in_channels // r.group) * math.prod(r.kernel)
    # 120→480 1×1, 960→60 1×3, 60→120 1×1, each on the 1×40 sequence left of a 48×320 line
    assert [r.macs for r in lost] == [480 * 40 * 120, 60 * 40 * 960 * 3, 120 * 40 * 60]
    assert static.totals["macs_bias"] == 666_054_660  # onnx-tool 1.0.1's count (MACs with bias)


def test_load_probe_warns(recwarn) -> None:
    load(computed_reshape(), probe=True)
    assert any(issubclass(w.category, ConvGraphWarning) and "--probe ran the model" in str(w.message) for w in recwarn)


def test_rewrite_probe_gives_the_lost_convs_their_macs(tmp_path, capsys) -> None:
    """`rewrite --probe`: the conv after the computed Reshape gets MACs before → after; the warning is shown."""
    path = write_model(tmp_path, computed_reshape())
    argv = ["rewrite", path, "--rule", "separable", "--param", "rank=full", "--no-bench", "--json", "--dry-run"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    changes = {c["node"]: c for c in json.loads(out)["changes"]}
    assert changes["conv2"]["macs_before"] is None and "--probe ran" not in err
    code, out, err = run_cli(capsys, *argv, "--probe")
    assert code == 0, err
    report = json.loads(out)
    conv2 = next(c for c in report["changes"] if c["node"] == "conv2")
    assert conv2["macs_before"] == 5 * 64 * 4 * 3 and conv2["macs_after"] == 64 * (12 * 3 + 12 * 5)  # rank 3: 12 channels, 1×3 then 1×1
    assert report["totals"]["macs_before"] is not None
    assert "--probe ran the model" in err and any("--probe ran the model" in w for w in report["warnings"])
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--param", "rank=full", "--no-bench",
                          "--probe", "-o", tmp_path / "out.onnx")  # a probed model still rewrites exactly
    assert code == 0 and (tmp_path / "out.onnx").exists(), err
