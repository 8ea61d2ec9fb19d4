"""convgraph.verify: metrics and polygraphy's tolerance rule, model checks, localization, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import convgraph
from convgraph.engine import localize
from convgraph.cli import main
from convgraph.errors import ModelError, UsageError
from convgraph.engine.verify import REWRITES_KEY, verify
from convgraph.run.metrics import compare
from helpers import perturbed

REAL = [("yolov8n", "images"), ("ppocr-det", "x")]


# ---- helpers --------------------------------------------------------------------------------------


def _middle_conv(model: onnx.ModelProto) -> str:
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return convs[len(convs) // 2]


def _tiny(op: str = "Relu", x_type=TensorProto.FLOAT, shape=(1, 4), name_in="x", name_out="y") -> onnx.ModelProto:
    x = helper.make_tensor_value_info(name_in, x_type, list(shape))
    y = helper.make_tensor_value_info(name_out, x_type, list(shape))
    nodes = [helper.make_node("Identity", [name_in], ["a"], name="pre"), helper.make_node(op, ["a"], [name_out], name="act")]
    return helper.make_model(helper.make_graph(nodes, "t", [x], [y]), opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8)


# ---- metrics --------------------------------------------------------------------------------------
def test_polygraphy_rule_abs_and_rel_must_both_fail():
    ref, cand = np.array([1.0, 100.0, 0.0]), np.array([1.5, 100.5, 0.0])
    m = compare(ref, cand, atol=0.1, rtol=0.01)
    assert m.mismatches == 1 and not m.passed  # 1 → 1.5 fails; 100 → 100.5 is within rtol
    assert m.max_abs_err == pytest.approx(0.5) and m.max_rel_err == pytest.approx(0.5)
    assert m.min_atol == pytest.approx(0.5) and m.min_rtol == pytest.approx(0.5)
    assert compare(ref, cand, atol=m.min_atol, rtol=0.01).passed
    assert compare(ref, cand, atol=0.1, rtol=m.min_rtol).passed
    assert m.mean_abs_err == pytest.approx(1 / 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1, 1)), min_size=1, max_size=40),
       st.floats(1e-6, 1e-1), st.floats(1e-6, 1e-1))
def test_min_tolerances_are_the_smallest_that_pass(pairs, atol, rtol):
    ref = np.array([p[0] for p in pairs])
    cand = ref + np.array([p[1] for p in pairs])
    m = compare(ref, cand, atol=atol, rtol=rtol)

    def within(m):  # no element out: a pass, or inconclusive when the reference is all within atol of 0
        return m.passed or m.inconclusive

    assert within(compare(ref, cand, atol=max(atol, m.min_atol), rtol=rtol))
    if math.isfinite(m.min_rtol):  # inf: an error where the reference is exactly 0 needs atol
        assert within(compare(ref, cand, atol=atol, rtol=max(rtol, m.min_rtol)))
    if m.min_atol > atol:
        assert not within(compare(ref, cand, atol=m.min_atol * (1 - 1e-9), rtol=rtol))
    assert within(m) == (m.min_atol <= atol)


def test_nan_always_fails_and_equal_infinities_do_not():
    m = compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), atol=1e9, rtol=1e9)
    assert not m.passed and m.nan == 1
    m = compare(np.array([np.inf, 1.0]), np.array([np.inf, 1.0]))
    assert m.passed and m.max_abs_err == 0
    assert not compare(np.array([np.inf]), np.array([1.0])).passed


def test_cosine_snr_topk_and_float16():
    ref = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    m = compare(ref, 2 * ref, atol=10, rtol=10)
    assert m.cosine == pytest.approx(1.0) and m.snr_db == pytest.approx(0.0, abs=1e-9) and m.top1 == 1.0
    assert compare(ref, -ref).cosine == pytest.approx(-1.0)
    assert compare(ref, ref).snr_db == math.inf and compare(ref, ref).cosine == 1.0
    swapped = ref.copy()
    top = ref.argmax(1)
    swapped[np.arange(4), top] = ref.min() - 1  # the top class drops out of every row
    m = compare(ref, swapped)
    assert m.top1 == 0.0 and m.k == 5 and m.topk == pytest.approx(4 / 5)
    m = compare(ref, ref.astype(np.float16))
    assert m.dtype == "float32/float16" and 0 < m.max_abs_err < 2e-3 and m.passed


def test_min_cosine_alone_replaces_elementwise_tolerance():
    ref = np.random.default_rng(0).standard_normal(1000)
    cand = ref + 0.05 * np.random.default_rng(1).standard_normal(1000)
    assert not compare(ref, cand).passed
    assert compare(ref, cand, min_cosine=0.99).passed
    assert not compare(ref, cand, min_cosine=0.99, atol=1e-3).passed  # both given: both must hold
    assert not compare(ref, cand, min_cosine=0.99999).passed
    with pytest.raises(UsageError):
        compare(ref, cand, min_cosine=2)
    with pytest.raises(UsageError):
        compare(ref, cand, atol=-1)


def test_shape_mismatch_fails():
    m = compare(np.zeros((1, 3)), np.zeros((1, 4)))
    assert not m.passed and "shape" in m.error


def test_metrics_accumulate_over_samples():
    refs = [np.zeros(3), np.ones(3)]
    m = compare(refs, [np.zeros(3), np.array([1.0, 1.0, 3.0])])
    assert m.samples == 2 and m.elements == 6 and m.max_abs_err == 2.0 and not m.passed


# ---- models ---------------------------------------------------------------------------------------
def test_verify_figures_are_onnxruntimes_on_the_same_inputs(models_dir):
    """verify's figures against ones computed here, with onnxruntime sessions of its own on the same inputs:
    a candidate whose classifier bias is 0.25 higher on one logit errs by exactly that, fails the default
    tolerance, and the divergence is first seen at that Gemm."""
    import onnxruntime as ort

    p = models_dir / "sample.onnx"
    cand = onnx.load(p)
    bias = next(t for t in cand.graph.initializer if t.name == "head/fc/B")
    shifted = onnx.numpy_helper.to_array(bias).copy()
    shifted[3] += 0.25
    bias.CopyFrom(onnx.numpy_helper.from_array(shifted, bias.name))
    feeds = [{"x": x} for x in np.random.default_rng(3).standard_normal((3, 1, 3, 64, 64)).astype(np.float32)]
    r = verify(p, cand, inputs=feeds, localize=True)
    ref_s, cand_s = (ort.InferenceSession(m, providers=["CPUExecutionProvider"])
                     for m in (p.read_bytes(), cand.SerializeToString()))
    ref = [ref_s.run(None, f)[0].astype(np.float64) for f in feeds]
    got = [cand_s.run(None, f)[0].astype(np.float64) for f in feeds]
    cos = [float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(ref, got)]
    m = r.outputs["logits"]
    assert not r.passed and m.samples == 3 and m.elements == 30
    assert m.max_abs_err == pytest.approx(0.25, rel=1e-5) == max(np.abs(a - b).max() for a, b in zip(ref, got))
    assert m.sample_cosine == pytest.approx(cos, rel=1e-9) and m.cosine == pytest.approx(min(cos), rel=1e-9)
    assert m.top1 == np.mean([a.argmax() == b.argmax() for a, b in zip(ref, got)])
    assert r.first_divergent_node == "head/fc"


def test_sample_model_against_its_round_trip(models_dir):
    """The model rebuilt by ConvGraph (other bytes, same computation) compares equal, tensor by tensor."""
    p = models_dir / "sample.onnx"
    r = verify(p, convgraph.load(p).to_model(), samples=2, localize=True)
    assert r.passed and r.samples == 2 and r.first_divergent_node is None and r.outputs["logits"].max_abs_err == 0
    assert r.localization.compared > 10 and r.localization.divergent == 0
    assert verify(convgraph.load(p), p.read_bytes()).passed  # ConvGraph and bytes are models too


def test_sample_model_perturbed_conv_is_localized(models_dir):
    p = models_dir / "sample.onnx"
    model = onnx.load(p)
    for conv in ("block2/pw", "block4/conv5x5"):
        r = verify(p, perturbed(model, conv), localize=True, samples=2)
        assert not r.passed
        assert r.first_divergent_node == conv
        loc = r.localization
        assert loc.first_divergent_op == "Conv" and not loc.tensor.passed
        assert loc.inputs and all(i.get("graph_input") or i["passed"] for i in loc.inputs)
        assert r.first_divergent_origin is None  # no rewrite record in the candidate
        assert conv in r.summary()


def test_localization_in_chunks_finds_the_same_node(models_dir, monkeypatch):
    p = models_dir / "sample.onnx"
    cand = perturbed(onnx.load(p), "block3/dilated")
    monkeypatch.setattr(localize, "LOCALIZE_CHUNK_BYTES", 1)  # one tensor per chunk
    r = verify(p, cand, localize=True)
    assert r.first_divergent_node == "block3/dilated"


@pytest.mark.real
@pytest.mark.parametrize("name,inp", REAL)
def test_real_model_against_itself_and_its_round_trip(real_models, name, inp):
    p = real_models(name)
    shapes = {inp: [1, 3, 320, 320]}
    assert verify(p, p, input_shapes=shapes).passed
    r = verify(p, convgraph.load(p, shapes).to_model(), input_shapes=shapes, localize=True)
    assert r.passed and r.first_divergent_node is None and r.localization.compared > 200


@pytest.mark.real
@pytest.mark.parametrize("name,inp", REAL)
def test_real_model_perturbed_conv_is_localized(real_models, name, inp):
    p = real_models(name)
    model = onnx.load(p)
    conv = _middle_conv(model)
    r = verify(p, perturbed(model, conv), input_shapes={inp: [1, 3, 320, 320]}, localize=True)
    assert not r.passed
    assert r.first_divergent_node == conv
    assert r.localization.region == [conv]
    assert all(i.get("graph_input") or i["passed"] for i in r.localization.inputs)


def test_failing_sample_is_the_one_localized():
    ref, cand = _tiny("Relu"), _tiny("Abs")  # they differ on negative inputs only
    inputs = [{"x": np.ones((1, 4), np.float32)}, {"x": -np.ones((1, 4), np.float32)}]
    r = verify(ref, cand, inputs=inputs, localize=True)
    assert not r.passed and r.samples == 2 and r.outputs["y"].mismatches == 4
    assert r.localization.sample == 1 and r.first_divergent_node == "act"
    assert verify(ref, cand, inputs=inputs[:1]).passed


def test_float16_candidate_is_cast_for_metrics():
    ref = _tiny("Relu")
    cand = _tiny("Relu", TensorProto.FLOAT16)
    r = verify(ref, cand, atol=1e-3, rtol=1e-3)
    assert r.passed and r.outputs["y"].dtype == "float32/float16" and r.outputs["y"].max_abs_err > 0


def test_models_must_match():
    with pytest.raises(ModelError, match="different inputs"):
        verify(_tiny(), _tiny(name_in="z"))
    with pytest.raises(ModelError, match="different outputs"):
        verify(_tiny(), _tiny(name_out="z"))
    with pytest.raises(ModelError, match=r"input 'x' has shape \[1,4\] in the reference, \[1,5\]"):
        verify(_tiny(), _tiny(shape=(1, 5)))
    with pytest.raises(ModelError, match="is float in the reference, int32"):
        verify(_tiny(), _tiny("Abs", TensorProto.INT32))


def test_cuda_without_the_provider_names_the_install():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match=r"pip install 'convgraph\[cuda\]'"):
        verify(_tiny(), _tiny(), provider="cuda")


def test_reference_evaluator_second_reference(models_dir):
    p = models_dir / "sample.onnx"
    r = verify(p, p, reference_evaluator=True)
    ev = r.reference_evaluator
    assert r.passed and ev["passed"] and 0 < ev["reference"]["logits"].max_abs_err < 1e-4
    r = verify(p, perturbed(onnx.load(p), "block2/pw"), reference_evaluator=True)
    assert not r.passed and not r.reference_evaluator["candidate"]["logits"].passed
    assert "onnx.reference" in " ".join(r.failures())


# ---- rewritten models: metadata and tensor maps ---------------------------------------------------
def _split_conv(model: onnx.ModelProto, conv_name: str, rename_output: str | None = None) -> onnx.ModelProto:
    """Replace ``conv_name`` by a perturbed conv into a new tensor + Identity to the old output, as a rewrite
    rule would (the output name kept), and store the rewrite record; or rename the conv's output tensor."""
    m = perturbed(model, conv_name)
    nodes = list(m.graph.node)
    i = next(j for j, n in enumerate(nodes) if n.name == conv_name)
    conv = nodes[i]
    out = conv.output[0]
    if rename_output:
        conv.output[0] = rename_output
        for n in nodes[i + 1:]:
            for k, t in enumerate(n.input):
                if t == out:
                    n.input[k] = rename_output
        return m
    new_conv = onnx.NodeProto()
    new_conv.CopyFrom(conv)
    new_conv.name, new_conv.output[0] = conv_name + "/a", out + "/tmp"
    ident = helper.make_node("Identity", [out + "/tmp"], [out], name=conv_name + "/b")
    del m.graph.node[:]
    m.graph.node.extend(nodes[:i] + [new_conv, ident] + nodes[i + 1:])
    record = {"rewrites": [{"rule": "test", "old_nodes": [conv_name], "new_nodes": [new_conv.name, ident.name],
                            "exact": True}], "tensor_map": {}}
    m.metadata_props.add(key=REWRITES_KEY, value=json.dumps(record))
    return m


def test_rewrite_record_names_the_replaced_node(models_dir):
    p = models_dir / "sample.onnx"
    cand = _split_conv(onnx.load(p), "block1/conv")
    r = verify(p, cand, localize=True)
    assert r.first_divergent_node == "block1/conv/b"
    assert r.localization.region == ["block1/conv/a", "block1/conv/b"]
    assert r.first_divergent_origin == "block1/conv"
    assert r.localization.rewrite["rule"] == "test" and r.localization.unmatched == 1


def test_renamed_tensors_are_matched_through_the_tensor_map(models_dir):
    p = models_dir / "sample.onnx"
    ref = onnx.load(p)
    old = next(n for n in ref.graph.node if n.name == "block1/conv").output[0]
    cand = _split_conv(ref, "block1/conv", rename_output="renamed")
    r = verify(p, cand, localize=True)  # the conv's output has no counterpart: the next node is blamed
    assert r.first_divergent_node == "block1/bn" and r.localization.region == ["block1/conv", "block1/bn"]
    r = verify(p, cand, localize=True, tensor_map={"renamed": old})
    assert r.first_divergent_node == "block1/conv"
    cand.metadata_props.add(key=REWRITES_KEY, value=json.dumps({"rewrites": [], "tensor_map": {"renamed": old}}))
    assert verify(p, cand, localize=True).first_divergent_node == "block1/conv"


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_json(models_dir, tmp_path, capsys):
    p = str(models_dir / "sample.onnx")
    assert main(["verify", p, p, "--samples", "2"]) == 0
    assert "PASSED" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    onnx.save(perturbed(onnx.load(p), "block2/pw"), bad)
    assert main(["verify", p, str(bad), "--localize"]) == 1
    captured = capsys.readouterr()
    assert "first divergent node" in captured.out and "block2/pw" in captured.err
    assert main(["verify", p, str(bad), "--localize", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # nothing but JSON on stdout
    assert doc["passed"] is False and doc["first_divergent_node"] == "block2/pw"
    assert set(doc["outputs"]["logits"]) >= {"max_abs_err", "max_rel_err", "mean_abs_err", "cosine", "snr_db",
                                             "min_atol", "min_rtol", "top1"}
    assert main(["verify", p, str(bad), "--min-cosine", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_cli_reference_evaluator(models_dir, capsys):
    p = str(models_dir / "sample.onnx")
    assert main(["verify", p, p, "--reference", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reference_evaluator"]["passed"] is True
    assert doc["reference_evaluator"]["reference"]["logits"]["max_abs_err"] < 1e-4


def test_cli_bad_input_exits_2(models_dir, tmp_path, capsys):
    p = str(models_dir / "sample.onnx")
    assert main(["verify", p, str(models_dir / "standard.onnx")]) == 2
    assert "shape" in capsys.readouterr().err
    assert main(["verify", p, str(tmp_path / "missing.onnx")]) == 2
    np.savez(tmp_path / "d.npz", y=np.zeros((1, 3, 64, 64), np.float32))
    assert main(["verify", p, p, "--inputs", str(tmp_path / "d.npz")]) == 2
    assert "no array for input 'x'" in capsys.readouterr().err
    (tmp_path / "map.json").write_text("[1, 2]")
    assert main(["verify", p, p, "--localize", "--tensor-map", str(tmp_path / "map.json")]) == 2
    assert main(["verify", p, p, "--atol", "-1"]) == 2
    assert main(["verify", str(models_dir / "dynamic.onnx"), str(models_dir / "dynamic.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_cli_npz_inputs_with_samples(models_dir, tmp_path, capsys):
    p = str(models_dir / "sample.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((3, 1, 3, 64, 64)).astype(np.float32))
    assert main(["verify", p, p, "--inputs", str(tmp_path / "d.npz"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 3 and doc["outputs"]["logits"]["samples"] == 3
