"""The rule engine: selection, splicing, orphan removal, checks, refusal of broken exact rewrites, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

import convgraph
from convgraph.cli import main
from convgraph.errors import CheckFailed, UsageError
from convgraph.model.record import REWRITES_KEY
from convgraph.registry import all_rules
from convgraph.engine.rewrite import Selection, rewrite
from convgraph.rule import Replacement
from convgraph.run.runtime import create_session, run

warnings.simplefilter("ignore", convgraph.ConvGraphWarning)


def _outputs(model, feeds):
    return run(create_session(model), feeds)


def _feeds(model, seed=0):
    from convgraph.run.inputs import make_inputs

    return make_inputs(model, seed=seed)[0]


def _op_names(model):
    return [n.name for n in model.graph.node]


def test_fold_bn_is_exact_and_leaves_the_rest_alone(models_dir):
    src = models_dir / "conv_bn.onnx"
    original = onnx.load(src)
    res = rewrite(src, ["fold-bn"])
    m = res.model
    assert [c.rule for c in res.report.changes] == ["fold-bn", "fold-bn"]
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert [i.name for i in m.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in original.graph.output]
    assert list(m.opset_import) == list(original.opset_import)
    relus = [n for n in original.graph.node if n.op_type == "Relu"]
    assert all(r in m.graph.node for r in relus)  # unrelated nodes untouched, byte for byte
    onnx.checker.check_model(m, full_check=True)
    feeds = _feeds(original)
    np.testing.assert_allclose(_outputs(m, feeds)[0], _outputs(original, feeds)[0], rtol=1e-4, atol=1e-5)
    assert all(c.output_error is not None and c.output_error < 1e-5 for c in res.report.changes)
    record = json.loads(next(p.value for p in m.metadata_props if p.key == REWRITES_KEY))
    assert {tuple(r["old_nodes"]) for r in record["rewrites"]} == {("block1/conv", "block1/bn"), ("block2/conv", "block2/bn")}


def test_separable_full_on_the_sample_is_exact_and_named_readably(models_dir):
    """Exact by onnxruntime itself (sessions made here, inputs drawn here), not by the report's own verdict."""
    import onnxruntime as ort

    path = models_dir / "sample.onnx"
    res = rewrite(path, ["separable"], params={"rank": "full"})
    names = _op_names(res.model)
    assert "stem/conv/dw" in names and "stem/conv/pw" in names
    assert "stem/conv" not in names
    ref, new = (ort.InferenceSession(m, providers=["CPUExecutionProvider"])
                for m in (path.read_bytes(), res.model.SerializeToString()))
    for x in np.random.default_rng(7).standard_normal((4, 1, 3, 64, 64)).astype(np.float32):
        a, b = ref.run(None, {"x": x})[0], new.run(None, {"x": x})[0]
        assert a.shape == b.shape == (1, 10) and np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert res.report.verification["passed"]  # and the report says so
    # the replaced conv's weight initializer is gone, nothing dangles
    inits = {t.name for t in res.model.graph.initializer}
    used = {i for n in res.model.graph.node for i in n.input}
    assert inits <= used


def test_selection_filters_and_explains(models_dir):
    src = models_dir / "sample.onnx"
    res = rewrite(src, ["separable"], selection=Selection(nodes="block", exclude="conv5x5"), dry_run=True)
    assert res.model is None
    assert {c.node for c in res.report.changes} == {"block1/conv", "block3/dilated"}
    reasons = {(e.node, e.rule): e.reason for e in res.report.explain}
    assert "does not match --nodes" in reasons[("stem/conv", "separable")]
    assert "matches --exclude" in reasons[("block4/conv5x5", "separable")]
    assert not reasons[("block2/dw", "separable")] == "applies"  # a depthwise conv is not a candidate
    res = rewrite(src, ["separable"], selection=Selection(kinds=("standard",), min_macs=3_000_000), dry_run=True)
    assert {c.node for c in res.report.changes} == {"block3/dilated"}
    assert all(c.macs_before >= 3_000_000 for c in res.report.changes)


def test_unknown_rule_and_param_are_usage_errors(models_dir):
    with pytest.raises(UsageError, match="unknown rule"):
        rewrite(models_dir / "sample.onnx", ["no-such-rule"])
    with pytest.raises(UsageError, match="not a parameter"):
        rewrite(models_dir / "sample.onnx", ["dense"], params={"rank": "2"})
    with pytest.raises(UsageError, match="bad --nodes regex"):
        rewrite(models_dir / "sample.onnx", ["separable"], selection=Selection(nodes="("))


def test_a_broken_exact_rule_is_refused_naming_the_node(models_dir):
    rule = all_rules()["separable"]
    real_build = rule.build

    def broken(rec, ctx, params) -> Replacement:
        rep: Replacement = real_build(rec, ctx, params)
        if rec.name == "block1/conv":  # corrupt one weight of one node: the engine must catch it
            for t in rep.initializers:
                if t.name.endswith("pw_W") or "/pw" in t.name:
                    arr = onnx.numpy_helper.to_array(t) * np.float32(1.01)
                    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
                    break
        return rep

    object.__setattr__(rule, "build", broken)  # Rule is frozen; restore it whatever happens
    try:
        with pytest.raises(CheckFailed, match="block1/conv"):
            rewrite(models_dir / "sample.onnx", ["separable"], params={"rank": "full"})
    finally:
        object.__setattr__(rule, "build", real_build)


def test_constant_node_weights_do_not_dangle(models_dir):
    src = models_dir / "constant_weights.onnx"
    before = onnx.load(src)
    res = rewrite(src, ["separable"], params={"rank": "full"}, verify=False)
    assert res.report.changes, "the committed model has a conv separable takes: a regression, not a skip"
    m = res.model
    produced_by_const = {o for n in m.graph.node if n.op_type in ("Constant", "ConstantOfShape") for o in n.output}
    read = {i for n in m.graph.node for i in n.input}
    assert produced_by_const <= read | {o.name for o in m.graph.output}
    assert len(m.graph.node) >= len(before.graph.node)


def test_rewrite_inside_a_subgraph(models_dir):
    src = models_dir / "subgraph.onnx"
    res = rewrite(src, ["separable"], params={"rank": "full"})
    assert any(c.graph for c in res.report.changes), "the conv in the If branch must be reachable"
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.verification["passed"]


def test_approximate_rule_reports_error_and_tolerance_fails(models_dir):
    res = rewrite(models_dir / "sample.onnx", ["separable"], params={"rank": "1"}, min_cosine=0.999999)
    assert not res.report.passed
    assert all(c.weight_error and c.weight_error > 0 for c in res.report.changes)
    assert all(c.output_error is not None and c.output_error > 1e-3 for c in res.report.changes)


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_refuses_to_overwrite_the_input(models_dir, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes((models_dir / "conv_bn.onnx").read_bytes())
    before = src.read_bytes()
    assert main(["rewrite", str(src), "--rule", "fold-bn", "-o", str(src), "--no-bench"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert main(["rewrite", str(src), "--rule", "fold-bn", "-o", str(src), "--in-place", "--no-bench"]) == 0
    assert src.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # atomic: no temp file left


def test_cli_tolerance_exit_code_and_keep_failed(models_dir, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    args = ["rewrite", models_dir / "sample.onnx", "--rule", "separable", "--min-cosine", "0.999999", "--no-bench", "-o", out]
    assert main(list(map(str, args))) == 1
    assert not out.exists()
    assert main(list(map(str, args + ["--keep-failed"]))) == 1
    assert out.exists()


def test_cli_json_dry_run_and_explain(models_dir, capsys):
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "separable", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] and doc["output"] is None
    assert doc["totals"]["macs_after"] < doc["totals"]["macs_before"]
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "dense", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "block3/dilated" in text and "applies" in text


def test_cli_rules_lists_every_builtin(capsys):
    assert main(["rules", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"separable", "spatial-separable", "dilated", "dense", "transpose-resize", "transpose-subpixel",
            "fold-bn"} <= names


def test_calibrated_rewrite_beats_the_weight_fit_on_other_inputs(models_dir):
    from convgraph.run.inputs import make_inputs

    src = models_dir / "sample.onnx"
    calib = [make_inputs(onnx.load(src), seed=s)[0] for s in range(1, 9)]  # verification uses seed 0
    plain = rewrite(src, ["separable"], params={"rank": "2"})
    fitted = rewrite(src, ["separable"], params={"rank": "2"}, calib=calib)
    assert all("calibration" in c.notes for c in fitted.report.changes)
    cos = lambda r: r.report.verification["outputs"]["logits"]["cosine"]  # noqa: E731
    assert cos(fitted) > cos(plain) + 0.05
    assert sum(c.output_error for c in fitted.report.changes) < sum(c.output_error for c in plain.report.changes)
    forced = rewrite(src, ["separable"], params={"rank": "2", "fit": "weights"}, calib=calib)
    assert cos(forced) == pytest.approx(cos(plain))


def test_default_output_says_per_rule_why_nothing_was_rewritten(models_dir, tmp_path, capsys):
    """A model of ConvInteger/QLinearConv only: each rule's reason in the default output (it was --explain
    only); nothing matched is not a failure (exit 0, the copy written)."""
    out = tmp_path / "q.onnx"
    code = main(["rewrite", str(models_dir / "quantized.onnx"), "--rule", "separable", "--rule", "low-rank",
                 "--rule", "fold-bn", "-o", str(out), "--no-bench"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and out.exists()
    assert "nothing rewritten" in text
    assert "fold-bn, separable, low-rank: none of 2 convs rewritten: quantized (ConvInteger/QLinearConv)" in text
    assert "quantize afterwards (qconv, convint)" in text


def _selected(report):
    return [(c.node, c.rule, c.macs_before, c.macs_after, c.params_before, c.params_after) for c in report.changes]


@pytest.mark.parametrize("rules", [["separable", "low-rank"], ["transpose-resize", "dilated", "separable"],
                                   ["fold-bn", "separable", "spatial-separable"], ["low-rank", "prune"]])
def test_dry_run_selects_exactly_as_the_real_run(models_dir, rules):
    """Two rules on one model: the real run applies the second to the first one's result (separable, then
    low-rank on its pointwise half); the dry run listed both rules on every original conv instead."""
    for name in ("sample.onnx", "conv_bn.onnx"):
        dry = rewrite(models_dir / name, rules, dry_run=True).report
        real = rewrite(models_dir / name, rules, verify=False).report
        assert _selected(dry) == _selected(real), (name, rules)
        assert dry.totals == real.totals


@pytest.mark.real
def test_dry_run_on_yolov8n_counts_each_conv_once(real_models, capsys):
    """The issue's command: separable then low-rank on YOLOv8n. The dry run's totals were the sum of both rules
    on every conv (more MACs saved than the model has); now they are the real run's."""
    path, shape = real_models("yolov8n"), {"images": [1, 3, 320, 320]}
    dry = rewrite(path, ["separable", "low-rank"], input_shapes=shape, dry_run=True).report
    real = rewrite(path, ["separable", "low-rank"], input_shapes=shape, verify=False).report
    assert _selected(dry) == _selected(real) and dry.totals == real.totals
    model_macs = convgraph.analyze(convgraph.load(path, shape), rewrites=False).totals["macs"]
    assert dry.totals["macs_before"] <= model_macs


def test_dry_run_time_estimates_never_exceed_a_convs_time(models_dir, capsys):
    """separable then low-rank: the low-rank change on a separable result's pointwise half gets that half's share
    of the original conv's measured time; the savings of one original conv add up to less than its time."""
    code = main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "separable", "--rule", "low-rank", "--dry-run",
                 "--profile", "--threads", "1", "--runs", "3", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    original = {e["node"]: e["time_ms"] for e in doc["time_estimates"] if e["rule"] == "separable"}
    measured = {**{e["node"]: e["time_ms"] for e in doc["time_estimates"]}, **original}
    saved: dict = {}
    for e in doc["time_estimates"]:
        assert e["saved_ms_estimate"] is not None, e
        root = e["node"].removesuffix("/pw") if e["node"].removesuffix("/pw") in original else e["node"]
        saved[root] = saved.get(root, 0.0) + e["saved_ms_estimate"]
    assert any(e["node"].endswith("/pw") for e in doc["time_estimates"])
    assert all(s < measured[root] for root, s in saved.items()), (saved, measured)


def test_dry_run_shows_formulas_where_dims_are_dynamic(models_dir):
    """`MACs ? → ?` where analyze has formulas: each change and the totals carry them, and at a concrete shape
    they equal the numbers the concrete dry run gives."""
    from convgraph.model.expr import parse

    sym = rewrite(models_dir / "dynamic.onnx", ["separable", "low-rank"], dry_run=True).report
    fixed = rewrite(models_dir / "dynamic.onnx", ["separable", "low-rank"], dry_run=True,
                    input_shapes={"x": [2, 3, 19, 23]}).report
    at = {"N": 2, "H": 19, "W": 23}
    assert [c.node for c in sym.changes] == [c.node for c in fixed.changes]
    for a, b in zip(sym.changes, fixed.changes):
        assert a.macs_before is None and a.macs_before_expr.evaluate(at) == b.macs_before, a
        assert a.macs_after is None and a.macs_after_expr.evaluate(at) == b.macs_after, a
    doc = sym.to_dict()["totals"]
    assert parse(doc["macs_before_expr"]).evaluate(at) == fixed.totals["macs_before"]
    assert parse(doc["macs_after_expr"]).evaluate(at) == fixed.totals["macs_after"]
    json.dumps(sym.to_dict())
