"""Rule prune: channel pruning between a conv and its consumer convs, refitted by least squares.

Checked with onnxruntime: the exact variant (keep=dead) against the original to 1e-4 by the engine, the
approximate one by the consumers' output error, which the data-aware refit must make smaller than both
dropping the same channels without refit and choosing by the weights alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_rules_approx import smooth
from test_rules_exact import assert_same, rewrite_with, run

from convgraph.engine.calibrate import calibrate
from convgraph.engine.rewrite import Selection, rewrite

RNG = np.random.default_rng(0)


def conv(name, x, y, w, b=None, **attrs):
    """(node, initializers) of a Conv ``name`` reading ``x``; 3×3 kernels get pads 1 unless ``pads`` is given."""
    inits = [numpy_helper.from_array(np.asarray(w, np.float32), f"{name}_W")]
    if b is not None:
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), f"{name}_B"))
    if w.shape[-1] == 3 and "pads" not in attrs and "auto_pad" not in attrs:
        attrs["pads"] = [1, 1, 1, 1]
    return helper.make_node("Conv", [x, *(i.name for i in inits)], [y], name=name, **attrs), inits


def model(parts, outputs, c_in=4, hw=12, opset=17):
    """A model of input x (1, c_in, hw, hw) from (node, initializers) parts and bare nodes."""
    nodes, inits = [], []
    for p in parts:
        n, i = p if isinstance(p, tuple) else (p, [])
        nodes.append(n)
        inits += i
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4) for o in outputs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def bn(name, x, y, c, seed=1):
    r = np.random.default_rng(seed)
    vals = [r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c), r.uniform(0.5, 2, c)]
    inits = [numpy_helper.from_array(v.astype(np.float32), f"{name}_{k}") for v, k in zip(vals, "sbmv")]
    return helper.make_node("BatchNormalization", [x] + [i.name for i in inits], [y], name=name), inits


def w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))


def conv_bn_relu_conv(producer_w=None, relu=True, hw=12):
    pw = w(8, 4, 3, 3) if producer_w is None else producer_w
    parts = [conv("p", "x", "a", pw, np.zeros(8)), bn("bn", "a", "b", 8)]
    parts.append(helper.make_node("Relu" if relu else "Identity", ["b"], ["c"], name="act"))
    parts.append(conv("q", "c", "y", w(5, 8, 3, 3, seed=2), np.full(5, 0.1)))
    return model(parts, ["y"], hw=hw)


def feeds(n, seed=0, hw=12, c=4):
    return [{"x": smooth([1, c, hw, hw], seed=seed + i)} for i in range(n)]


def error(original, rewritten, tests):
    """Relative L2 error of the model output over ``tests``."""
    ref = np.concatenate([run(original, f)[0].ravel() for f in tests])
    got = np.concatenate([run(rewritten, f)[0].ravel() for f in tests])
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def ablate(monkeypatch, how: str):
    """Keep the data-aware choice of channels but not its refit: ``mean`` (bias keeps the mean output) or
    ``none`` (the channels are just dropped)."""
    import convgraph.rules.prune as prune

    real = prune._choose

    def choose(rec, ctx, params, span, ws):
        dropped, _, means, note = real(rec, ctx, params, span, ws)
        return dropped, ws, means if how == "mean" else None, note

    monkeypatch.setattr(prune, "_choose", choose)


def test_refit_recovers_channels_that_the_kept_ones_explain():
    """Producer filters that are combinations of 3 filters and a linear path: keeping 4 of 8 channels and
    refitting by least squares is exact up to the ridge, while dropping them without refit is far off."""
    basis = w(3, 4, 3, 3, seed=5)
    pw = np.einsum("ij,jklm->iklm", RNG.standard_normal((8, 3)), basis).astype(np.float32)
    m = conv_bn_relu_conv(pw, relu=False)
    tests = feeds(3, seed=50)
    res = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=feeds(4))
    (c,) = res.report.changes
    assert "least squares" in c.notes and "kept 4 of 8" in c.notes and not c.exact
    assert error(m, res.model, tests) < 1e-2
    weights = rewrite(m, ["prune"], params={"keep": "0.5", "fit": "weights"}, calib=feeds(4)).model
    assert error(m, weights, tests) > 0.2


def test_conv_bn_relu_conv_data_refit_beats_no_refit_and_weight_choice(monkeypatch):
    m = conv_bn_relu_conv()
    tests = feeds(3, seed=50)
    res = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=feeds(6))
    (c,) = res.report.changes
    assert (c.macs_before, c.macs_after) == (8 * 4 * 9 * 144 + 5 * 8 * 9 * 144, 4 * 4 * 9 * 144 + 5 * 4 * 9 * 144)
    assert (c.params_before, c.params_after) == (8 * 36 + 8 + 5 * 72 + 5, 4 * 36 + 4 + 5 * 36 + 5)
    assert c.old_nodes == c.new_nodes == ["p", "bn", "act", "q"] and c.output == "y"
    got = {"data": error(m, res.model, tests)}
    got["weights"] = error(m, rewrite(m, ["prune"], params={"keep": "0.5", "fit": "weights"}).model, tests)
    for how in ("mean", "none"):
        with monkeypatch.context() as mp:
            ablate(mp, how)
            got[how] = error(m, rewrite(m, ["prune"], params={"keep": "0.5"}, calib=feeds(6)).model, tests)
    assert got["data"] < 0.8 * min(got["weights"], got["mean"], got["none"]), got
    bn = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert bn[next(n for n in bn if n.startswith("bn_s"))].shape == (4,)  # the BatchNormalization was sliced too
    more = rewrite(m, ["prune"], params={"channels": "6"}, calib=feeds(6))
    assert "kept 6 of 8" in more.report.changes[0].notes and error(m, more.model, tests) < got["data"]


def silu_two_consumers(c=6):
    parts = [conv("p", "x", "a", w(c, 4, 3, 3), np.linspace(-1, 1, c)),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
             helper.make_node("Mul", ["a", "s"], ["b"], name="silu"),
             conv("q1", "b", "y1", w(3, c, 1, 1, seed=3)), conv("q2", "b", "y2", w(2, c, 3, 3, seed=4), np.ones(2))]
    return model(parts, ["y1", "y2"])


def test_silu_with_two_consumers_prunes_both():
    m = silu_two_consumers()
    res = rewrite(m, ["prune"], params={"channels": "4"}, calib=feeds(4))
    (c,) = res.report.changes
    assert set(c.old_nodes) == {"p", "sig", "silu", "q1", "q2"} and "2 consumer(s)" in c.notes
    shapes = {i.name: numpy_helper.to_array(i).shape for i in res.model.graph.initializer}
    assert shapes["q1/pruned_W"] == (3, 4, 1, 1) and shapes["q2/pruned_W"] == (2, 4, 3, 3)
    assert shapes["p/pruned_W"][0] == 4
    tests = feeds(2, seed=40)
    for k in (0, 1):  # both consumers' outputs close to the original's
        ref = np.concatenate([run(m, f)[k].ravel() for f in tests])
        got = np.concatenate([run(res.model, f)[k].ravel() for f in tests])
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.5


def dead_model(consumer_kernel):
    pw = w(6, 4, 3, 3)
    pw[1] = 0.0  # bias -1 → Relu → 0: dead and foldable anywhere
    pw[4] = 0.0  # bias 0.5 → Relu → 0.5: foldable only without padding
    b = np.array([0.1, -1.0, 0.2, 0.0, 0.5, -0.2], np.float32)
    parts = [conv("p", "x", "a", pw, b), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             conv("q", "r", "y", w(3, 6, consumer_kernel, consumer_kernel, seed=3))]
    return model(parts, ["y"])


@pytest.mark.parametrize("kernel, kept", [(3, 5), (1, 4)])
def test_dead_channels_are_removed_exactly(kernel, kept):
    m = dead_model(kernel)
    res = rewrite(m, ["prune"], params={"keep": "dead"})
    (c,) = res.report.changes
    assert c.exact and f"kept {kept} of 6" in c.notes and c.output_error <= 1e-4  # the engine's exact checks passed
    for f in feeds(2, seed=9):
        assert_same(m, res.model, f)
    assert "no channel is provably constant" in rewrite_with(conv_bn_relu_conv(), "prune", {"keep": "dead"})[2]["p"]


def test_weight_choice_drops_dead_channels_first_and_folds_them():
    m = dead_model(1)
    res = rewrite(m, ["prune"], params={"channels": "4", "fit": "weights"})
    for f in feeds(2, seed=9):
        assert_same(m, res.model, f)


def test_refusals_say_why():
    def reason(parts, outputs=("y",), **params):
        return rewrite_with(model(parts, list(outputs)), "prune", params or None)[2]["p"]

    p = conv("p", "x", "a", w(6, 4, 3, 3))
    q = conv("q", "a", "y", w(3, 6, 1, 1))
    assert "graph output" in reason([p, q], ("y", "a"))
    concat = helper.make_node("Concat", ["a", "a"], ["y"], axis=1, name="cat")
    assert "feeds Concat 'cat', which is not a per-channel op" in reason([p, concat])
    side = conv("side", "x", "s", w(6, 4, 3, 3))
    add = helper.make_node("Add", ["a", "s"], ["z"], name="res")
    assert "mixes in 's' from outside" in reason([p, side, add, conv("q", "z", "y", w(3, 6, 1, 1))])
    g2 = conv("q", "a", "y", w(6, 3, 3, 3), group=2)
    assert "grouped (group=2)" in reason([p, g2])
    dw = conv("dw", "a", "y", w(6, 1, 3, 3), group=6)  # carried through, but its output is the model's
    assert "'y' is a graph output" in reason([p, dw])
    grouped = conv("p", "x", "a", w(6, 2, 3, 3), group=2)
    assert "producer is grouped" in reason([grouped, q])
    row = (helper.make_node("Mul", ["a", "k"], ["z"], name="scale"),
           [numpy_helper.from_array(np.ones((1, 1, 1, 12), np.float32), "k")])
    assert "not one value per channel" in reason([p, row, conv("q", "z", "y", w(3, 6, 1, 1))])
    assert "drops none" in reason([p, q], channels="6")


def test_on_the_committed_sample_model(models_dir):
    """sample.onnx: the stem (→ BN/Relu → conv) and block2's pointwise conv are pruned; the rest refuse with
    the reason (a ConvTranspose, a global pool, the producer itself depthwise)."""
    from convgraph.run.inputs import make_inputs

    path = models_dir / "sample.onnx"
    cal = list(make_inputs(onnx.load(path), None, samples=6, seed=1))
    res = rewrite(path, ["prune"], params={"keep": "0.5"}, calib=cal)
    assert sorted(c.node for c in res.report.changes) == ["block2/pw", "stem/conv"]
    why = {e.node: e.reason for e in res.report.explain if not e.applies}
    assert "block1/conv" not in why  # the stem's consumer: pruned with it
    assert "ConvTranspose" in why["block4/conv5x5"]
    assert "GlobalAveragePool" in why["head/conv1x1"] and "producer is grouped" in why["block2/dw"]
    tests = list(make_inputs(onnx.load(path), None, samples=3, seed=7))
    weights = rewrite(path, ["prune"], params={"keep": "0.5", "fit": "weights"}).model
    assert error(path, res.model, tests) < error(path, weights, tests)
    dry = rewrite(path, ["prune"], params={"keep": "0.5"}, dry_run=True)  # a consumer pruned with its producer
    assert sorted(c.node for c in dry.report.changes) == ["block2/pw", "stem/conv"]  # is not listed again


def yolo_crops(names, size):
    """Four size×size crops of each photo (the photo at twice the size), as YOLOv8n feeds."""
    from test_rules_approx import picture

    out = []
    for n in names:
        big = picture(n, 2 * size, 2 * size)
        out += [{"images": np.ascontiguousarray(big[:, :, i:i + size, j:j + size])}
                for i in (0, size) for j in (0, size)]
    return out


@pytest.mark.real
def test_data_refit_on_a_yolov8n_layer(real_models, monkeypatch):
    """/model.6/m.0/cv1 (64 channels → SiLU → 3×3 conv) at keep=0.5, calibrated on crops of 8 photos and judged
    on 6 other photos: the consumer's relative output error with the least-squares refit is well below
    dropping the same channels unrefitted (with or without the mean in the bias) and the weight-norm choice."""
    from test_rules_approx import picture

    import convgraph
    from convgraph.analysis.analyze import analyze
    from convgraph.run.runtime import run_with_outputs

    path, size = real_models("yolov8n"), 320
    shapes = {"images": [1, 3, size, size]}
    node = "/model.6/m.0/cv1/conv/Conv"
    recs = {r.name: r for r in analyze(convgraph.load(path, shapes), rewrites=False).convs}
    consumer = recs["/model.6/m.0/cv2/conv/Conv"]
    cal = calibrate(path, yolo_crops(["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                                      "hubble_deep_field.jpg", "camera.png", "brick.png", "gravel.png"], size),
                    nodes=[consumer.node_id], input_shapes=shapes)
    tests = [{"images": picture(n, size, size)} for n in
             ("chelsea.png", "retina.jpg", "coins.png", "grass.png", "horse.png", "page.png")]
    (ref,) = run_with_outputs(path, [consumer.output], tests).values()

    def err(params, **kw):
        res = rewrite(path, ["prune"], params=params, selection=Selection(nodes=f"^{node}$"), input_shapes=shapes, **kw)
        (c,) = res.report.changes
        assert c.old_nodes[-1] == consumer.name and c.output == consumer.output
        (got,) = run_with_outputs(res.model, [consumer.output], tests).values()
        return float(np.sqrt(sum(np.sum((g - r) ** 2) for g, r in zip(got, ref)) / sum(np.sum(r * r) for r in ref)))

    got = {"data": err({"keep": "0.5"}, calibration=cal), "weights": err({"keep": "0.5", "fit": "weights"})}
    for how in ("mean", "none"):
        with monkeypatch.context() as mp:
            ablate(mp, how)
            got[how] = err({"keep": "0.5"}, calibration=cal)
    print(got)  # measured: data 0.285, weights 0.617, none 0.605, mean 0.388
    assert got["data"] < 0.85 * got["mean"] and got["data"] < 0.6 * min(got["weights"], got["none"]), got


def test_cli_prunes_with_a_calibration_folder(models_dir, tmp_path, capsys):
    """`convgraph rewrite MODEL --rule prune --param keep=0.5 --calib DIR -o out.onnx --json`."""
    import json
    import os
    import shutil

    import skimage

    from convgraph.cli import main

    calib = tmp_path / "calib"
    calib.mkdir()
    for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(os.path.join(os.path.dirname(skimage.__file__), "data", n), calib / n)
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "prune", "--param", "keep=0.5", "--calib",
                 str(calib), "-o", str(out), "--no-bench", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    stem = next(c for c in doc["changes"] if c["node"] == "stem/conv")
    assert "least squares on calibration patches" in stem["notes"] and stem["macs_after"] < stem["macs_before"]
    assert doc["totals"]["macs_after"] < doc["totals"]["macs_before"] and out.exists()
    assert main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "prune", "--param", "keep=2", "-o",
                 str(out), "--no-bench"]) == 2
    assert "must be a share in (0, 1) or 'dead'" in capsys.readouterr().err


def mobilenet_block(dead=False):
    """pw → BN → HardSwish → depthwise 3×3 → BN → Relu → pw (a MobileNetV3-style block, no skip); ``dead``: the
    first BN and HardSwish become Relu and Identity and two filters are zero."""
    pw = w(8, 4, 1, 1)
    b = np.zeros(8, np.float32)
    if dead:  # channel 2: Relu(−1) = 0 reaches the depthwise conv, which leaves its bias; channel 5: Relu(0.5)
        pw[[2, 5]] = 0.0
        b[[2, 5]] = [-1.0, 0.5]
    parts = [conv("p", "x", "a", pw, b),
             bn("bn1", "a", "b", 8) if not dead else helper.make_node("Relu", ["a"], ["b"], name="r0"),
             helper.make_node("Identity" if dead else "HardSwish", ["b"], ["c"], name="id" if dead else "hs"),
             conv("dw", "c", "d", w(8, 1, 3, 3, seed=7), np.linspace(-0.5, 0.5, 8), group=8),
             bn("bn2", "d", "e", 8, seed=3), helper.make_node("Relu", ["e"], ["f"], name="r"),
             conv("q", "f", "y", w(6, 8, 1, 1, seed=8))]
    return model(parts, ["y"])


def test_a_depthwise_conv_between_is_pruned_with_the_channels():
    m = mobilenet_block()
    res = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=feeds(6))
    (c,) = res.report.changes
    assert c.old_nodes == ["p", "bn1", "hs", "dw", "bn2", "r", "q"]
    hw = 144
    assert (c.macs_before, c.macs_after) == ((8 * 4 + 8 * 9 + 6 * 8) * hw, (4 * 4 + 4 * 9 + 6 * 4) * hw)
    dw = next(n for n in res.model.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    tests = feeds(3, seed=50)
    weights = rewrite(m, ["prune"], params={"keep": "0.5", "fit": "weights"}).model
    assert error(m, res.model, tests) < error(m, weights, tests)


def test_dead_channels_through_a_depthwise_conv():
    m = mobilenet_block(dead=True)
    res = rewrite(m, ["prune"], params={"keep": "dead"})
    (c,) = res.report.changes
    assert c.exact and "kept 7 of 8" in c.notes  # channel 5 reaches the depthwise conv as 0.5: not provable
    for f in feeds(2, seed=9):
        assert_same(m, res.model, f)


def test_the_refit_ridge_is_chosen_on_held_out_batches(monkeypatch):
    """Few calibration patches for a wide consumer (8 channels × 3×3 from 4 maps of 5×5): a nearly unregularized
    refit overfits them; the ridge chosen on the held-out batches does better on new inputs."""
    import convgraph.rules.prune as prune

    m = conv_bn_relu_conv(hw=5)
    cal = [{"x": smooth([1, 4, 5, 5], seed=s)} for s in range(4)]
    tests = [{"x": smooth([1, 4, 5, 5], seed=60 + s)} for s in range(4)]
    chosen = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=cal)
    assert "chosen on held-out batches" in chosen.report.changes[0].notes
    monkeypatch.setattr(prune, "RIDGES", (1e-4,))
    tight = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=cal)
    assert error(m, chosen.model, tests) < 0.9 * error(m, tight.model, tests)


def test_float16_dead_channels():
    """A float16 model: the constants are evaluated in float16 and the new weights written back in it."""
    m = mobilenet_block(dead=True)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    res = rewrite(m, ["prune"], params={"keep": "dead"})
    (c,) = res.report.changes
    assert c.exact and "kept 7 of 8" in c.notes
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.FLOAT16}
    x = {"x": smooth([1, 4, 12, 12], seed=3).astype(np.float16)}
    np.testing.assert_allclose(run(res.model, x)[0], run(m, x)[0], rtol=1e-2, atol=1e-2)


def test_a_pass_prunes_alternate_layers_and_a_second_pass_the_rest():
    """conv → Relu → conv → Relu → conv: the first conv's pruning takes the second as its consumer, so one pass
    prunes the first only; run again, the rule prunes the (refitted) second."""
    parts = [conv("p", "x", "a", w(8, 4, 3, 3)), helper.make_node("Relu", ["a"], ["r"], name="r1"),
             conv("q", "r", "b", w(8, 8, 3, 3, seed=1)), helper.make_node("Relu", ["b"], ["s"], name="r2"),
             conv("z", "s", "y", w(3, 8, 1, 1, seed=2))]
    m = model(parts, ["y"])
    once = rewrite(m, ["prune"], params={"keep": "0.5"}, calib=feeds(4))
    assert [c.node for c in once.report.changes] == ["p"]
    twice = rewrite(once.model, ["prune"], params={"keep": "0.5"}, calib=feeds(4), selection=Selection(nodes="^q$"))
    (c,) = twice.report.changes
    assert c.old_nodes == ["q", "r2", "z"] and "kept 4 of 8" in c.notes


def test_totals_after_fold_bn_count_the_consumer_once():
    """fold-bn folds the producer's BatchNormalization, then prune takes the folded conv and its consumer: the
    totals' before counts both convs once (not the folded producer alone) and after the pruned pair."""
    m = conv_bn_relu_conv()
    res = rewrite(m, ["fold-bn", "prune"], params={"keep": "0.5"}, calib=feeds(4))
    assert [c.rule for c in res.report.changes] == ["fold-bn", "prune"]
    prune = res.report.changes[1]
    t = res.report.totals
    assert (t["macs_before"], t["macs_after"]) == (prune.macs_before, prune.macs_after) == (
        (8 * 4 + 5 * 8) * 9 * 144, (4 * 4 + 5 * 4) * 9 * 144)
    assert (t["params_before"], t["params_after"]) == (8 * 36 + 8 + 5 * 72 + 5, prune.params_after)
