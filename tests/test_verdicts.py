"""Verdicts that can be trusted at default settings (issue 11): inputs that mean something, references that say
nothing are inconclusive, each exact rewrite judged alone, localization that names a changed node, one JSON
document on refusal, counts of distinct convs."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph.cli import main
from convgraph.errors import CheckFailed, UsageError
from convgraph.run.inputs import image_layout, make_inputs
from convgraph.registry import all_rules
from convgraph.engine.rewrite import rewrite
from convgraph.engine.verify import verify

warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
DET = {"x": [1, 3, 640, 640]}


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    """Two printed-text images shipped with scikit-image."""
    skimage = pytest.importorskip("skimage")
    d = tmp_path_factory.mktemp("pages")
    for name in ("page.png", "text.png"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, d / name)
    return d


def _patched(rule_name, patch):
    """Context: the built-in rule's build wrapped by ``patch(real_build, rec, ctx, params)``."""
    rule = all_rules()[rule_name]
    real = rule.build

    class _Ctx:
        def __enter__(self):
            object.__setattr__(rule, "build", lambda rec, ctx, params: patch(real, rec, ctx, params))

        def __exit__(self, *exc):
            object.__setattr__(rule, "build", real)

    return _Ctx()


def _scale_weights(rep, factor):
    for t in rep.initializers:
        if t.name.endswith("pw_W") or "/pw" in t.name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
            return rep
    raise AssertionError("no pointwise weight to corrupt")


# ---- inputs ------------------------------------------------------------------------------------------------
def test_default_inputs_of_image_models_look_like_images(models_dir):
    data = make_inputs(onnx.load(models_dir / "sample.onnx"), samples=2)
    x = data[0]["x"]
    assert "image-like" in data.describe and x.min() >= 0 and x.max() <= 1
    # natural images are mostly smooth: neighbouring pixels agree far more than in uniform noise
    d = np.abs(np.diff(x, axis=-1)).mean()
    assert d < 0.5 * np.abs(np.diff(np.random.default_rng(0).random(x.shape), axis=-1)).mean()
    assert not np.array_equal(data[0]["x"], data[1]["x"]) and np.array_equal(data[0]["x"], data[0]["x"])
    assert image_layout((1, 3, 64, 64), np.float32) == "nchw" and image_layout((1, 64, 64, 3), np.uint8) == "nhwc"
    assert image_layout((1, 16, 64, 64), np.float32) is None and image_layout((1, 3, 64), np.float32) is None


def test_mean_and_std_apply_to_generated_images(models_dir):
    data = make_inputs(onnx.load(models_dir / "sample.onnx"), mean=[0.5], std=[0.5])
    x = data[0]["x"]
    assert x.min() < -0.5 and x.max() <= 1.0


def test_a_typo_in_input_shape_names_the_input(models_dir, capsys):
    for cmd in (["verify", str(models_dir / "dynamic.onnx"), str(models_dir / "dynamic.onnx")],
                ["bench", str(models_dir / "sample.onnx")]):
        assert main([*cmd, "--input-shape", "foo=1,3,8,8"]) == 2
        err = capsys.readouterr().err
        assert "no input 'foo'" in err and "dynamic" not in err


# ---- inconclusive, never a false pass ----------------------------------------------------------------------
@pytest.mark.real
def test_false_pass_on_uniform_noise_is_now_inconclusive(real_models, tmp_path, capsys):
    """PP-OCR det on uniform noise: its map is ~2e-5 everywhere, so a broken rewrite passed with cosine 0."""
    det = real_models("ppocr-det")
    sep = tmp_path / "d.sep.onnx"
    assert main(["rewrite", str(det), "--rule", "separable", "--input-shape", "x=1,3,640,640", "--no-bench",
                 "-o", str(sep)]) == 0
    capsys.readouterr()
    r = verify(det, sep, input_shapes=DET)  # default inputs: image-like, the map responds, the damage shows
    assert r.verdict == "failed" and r.outputs["sigmoid_0.tmp_0"].cosine < 0.95
    noise = tmp_path / "noise.npz"
    np.savez(noise, x=np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32))
    r = verify(det, sep, inputs=noise)
    assert r.verdict == "inconclusive" and not r.passed
    assert "--inputs" in r.summary() and "sigmoid_0.tmp_0" in r.summary()
    assert main(["verify", str(det), str(sep), "--inputs", str(noise), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "inconclusive" and doc["outputs"]["sigmoid_0.tmp_0"]["verdict"] == "inconclusive"


@pytest.mark.real
def test_fold_bn_on_ppocr_det_is_not_refused(real_models):
    """Refused before: the model-level check scaled by a near-zero map (error 0.00997 of 2e-5)."""
    res = rewrite(real_models("ppocr-det"), ["fold-bn"], input_shapes=DET)
    assert res.report.changes and all(c.output_error < 1e-4 and c.checked_on == "activations+random"
                                      for c in res.report.changes)


# ---- exact rewrites judged alone ---------------------------------------------------------------------------
def test_an_exact_rewrite_is_not_blamed_for_approximate_ones_upstream(models_dir):
    """Separable rank 1 everywhere but one conv at full rank: that one is exact on its own; judged against
    the original model it carried the upstream error and was refused."""
    def patch(real, rec, ctx, params):
        if rec.name == "block4/conv5x5":
            return real(rec, ctx, {**params, "rank": "full"})
        return real(rec, ctx, params)

    named = convgraph.engine.rewrite.Selection(nodes="stem|block1|block3|block4")  # full rank adds MACs: name the nodes
    with _patched("separable", patch):
        res = rewrite(models_dir / "sample.onnx", ["separable"], params={"rank": "1"}, selection=named)
    exact = [c for c in res.report.changes if c.exact]
    assert [c.node for c in exact] == ["block4/conv5x5"] and exact[0].output_error < 1e-5
    assert any(not c.exact and c.output_error > 1e-3 for c in res.report.changes)


def test_a_broken_exact_rewrite_inside_a_subgraph_beside_approximate_ones_is_refused(models_dir, capsys, tmp_path):
    """An exact rewrite in an If branch was never checked when an approximate rule ran too."""
    def patch(real, rec, ctx, params):
        if rec.name == "then/conv":
            rep = _scale_weights(real(rec, ctx, {**params, "rank": "full"}), 1.01)
            rep.exact = True
            return rep
        return real(rec, ctx, params)

    with _patched("separable", patch):
        with pytest.raises(CheckFailed, match="then/conv"):
            rewrite(models_dir / "subgraph.onnx", ["separable"], params={"rank": "1"},
                    selection=convgraph.engine.rewrite.Selection(nodes="conv"))
        code = main(["rewrite", str(models_dir / "subgraph.onnx"), "--rule", "separable", "--param", "rank=1",
                     "--nodes", "conv", "--json", "--dry-run"])
        assert code == 0
        capsys.readouterr()
        code = main(["rewrite", str(models_dir / "subgraph.onnx"), "--rule", "separable", "--param", "rank=1",
                     "--nodes", "conv", "--json", "-o", str(tmp_path / "never.onnx")])
    out = capsys.readouterr().out
    assert code == 1 and not (tmp_path / "never.onnx").exists()
    doc = json.loads(out)  # one JSON document on a refusal too
    assert "then/conv" in doc["refused"] and doc["passed"] is False and doc["output"] is None
    changed = {c["node"]: c for c in doc["changes"]}
    assert changed["then/conv"]["checked_on"] == "random" and changed["then/conv"]["output_error"] > 1e-3


def _one_by_one(c_in=16, c_out=1, hw=8):
    w = np.random.default_rng(0).standard_normal((c_out, c_in, 1, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="squeeze")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, hw, hw])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_approximate_rule_does_not_add_macs_unless_the_node_is_named():
    """YOLOv8n's DFL conv (16→1, 1×1) got a low-rank 'rewrite' that added MACs."""
    m = _one_by_one()
    res = rewrite(m, ["low-rank"])
    assert not res.report.changes
    assert "would add MACs" in res.report.explain[0].reason
    assert not rewrite(m, ["low-rank"], dry_run=True).report.changes
    named = rewrite(m, ["low-rank"], selection=convgraph.engine.rewrite.Selection(nodes="squeeze"))
    assert named.report.changes and named.report.changes[0].macs_after > named.report.changes[0].macs_before


@pytest.mark.real
def test_low_rank_on_yolov8n_is_not_refused_at_the_dfl_conv(real_models):
    res = rewrite(real_models("yolov8n"), ["low-rank"], input_shapes={"images": [1, 3, 320, 320]})
    nodes = {c.node for c in res.report.changes}
    assert "/model.22/dfl/conv/Conv" not in nodes and len(nodes) > 50
    assert all(c.macs_after <= c.macs_before for c in res.report.changes)


# ---- localization ------------------------------------------------------------------------------------------
@pytest.mark.real
def test_localization_names_a_rewritten_node_not_an_untouched_one(real_models, pages, tmp_path):
    det = real_models("ppocr-det")
    res = rewrite(det, ["separable"], input_shapes=DET, verify=False)
    sep = tmp_path / "d.sep.onnx"
    convgraph.save(res.model, sep)
    r = verify(det, sep, inputs=pages, image_size=[640, 640], mean=[0.5], std=[0.5], min_cosine=0.9, localize=True)
    new = {n for c in res.report.changes for n in c.new_nodes}
    assert not r.passed and r.first_divergent_node in new  # was p2o.BatchNormalization.0, untouched
    assert r.first_divergent_origin in {c.node for c in res.report.changes}


def test_localization_still_names_a_perturbed_node_without_a_record(models_dir):
    model = onnx.load(models_dir / "sample.onnx")
    conv = next(n for n in model.graph.node if n.name == "block2/pw")
    w = next(t for t in model.graph.initializer if t.name == conv.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.5), w.name))  # same name, new values
    r = verify(models_dir / "sample.onnx", model, localize=True)
    assert r.first_divergent_node == "block2/pw" and r.localization.shown_at_node is None


# ---- counting ----------------------------------------------------------------------------------------------
def test_totals_count_distinct_convs_and_match_the_analyzer(models_dir, capsys, tmp_path):
    res = rewrite(models_dir / "sample.onnx", ["fold-bn", "separable"], params={"rank": "full"}, verify=False)
    tot = res.report.totals
    before = convgraph.analyze(convgraph.load(models_dir / "sample.onnx")).totals["macs"]
    after = convgraph.analyze(convgraph.load(res.model)).totals["macs"]
    assert tot["changes"] == len(res.report.changes) > tot["rewritten"]
    assert tot["macs_after"] - tot["macs_before"] == after - before
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "fold-bn", "--rule", "separable",
                 "--param", "rank=full", "--dry-run"]) == 0
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "fold-bn", "--rule", "separable", "--param",
                 "rank=full", "--no-verify", "-o", str(tmp_path / "count.onnx")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{tot['rewritten']} convs rewritten in {tot['changes']} changes" in text and "× more" in text


def test_usage_error_for_unknown_input_in_library(models_dir):
    with pytest.raises(UsageError, match="no input 'nope'"):
        verify(models_dir / "sample.onnx", models_dir / "sample.onnx", input_shapes={"nope": [1]})


def test_every_json_outcome_is_one_document(models_dir, tmp_path, capsys):
    """Errors too: a pipeline reading stdout always gets one JSON document."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    for args, code in ((["analyze", str(bad), "--json"], 2),
                       (["verify", str(models_dir / "sample.onnx"), str(bad), "--json"], 2),
                       (["rewrite", str(models_dir / "sample.onnx"), "--rule", "nope", "-o", str(tmp_path / "o.onnx"),
                         "--json"], 2),
                       (["bench", str(models_dir / "sample.onnx"), "--runs", "x", "--json"], 2)):
        assert main(args) == code
        doc = json.loads(capsys.readouterr().out)
        assert doc["exit_code"] == code and doc["error"]


def test_localization_passes_over_intermediates_that_say_nothing():
    """An intermediate that is ~0 everywhere (under atol) with tiny candidate differences is inconclusive, not
    the first divergent tensor: the real change downstream is named."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])

    def model(tiny: float, scale: float):
        inits = [numpy_helper.from_array(np.full(4, tiny, np.float32), "e"),
                 numpy_helper.from_array(np.full(4, scale, np.float32), "k")]
        nodes = [helper.make_node("Mul", ["x", "e"], ["faint"], name="faint"),  # ~1e-7: says nothing
                 helper.make_node("Add", ["faint", "x"], ["sum"], name="sum"),
                 helper.make_node("Mul", ["sum", "k"], ["y"], name="scale")]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                 opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    ref, cand = model(1e-7, 1.0), model(2e-7, 2.0)  # 'faint' moves far below atol; 'scale' doubles the output
    r = verify(ref, cand, inputs=[{"x": np.random.default_rng(0).random((1, 4), dtype=np.float32) + 0.5}], localize=True)
    assert r.verdict == "failed" and r.first_divergent_node == "scale"
