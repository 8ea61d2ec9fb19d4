"""optimize with rules whose match spans more than the conv (prune): subgraph timing, statistics, the search."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import helper
from test_rule_prune import bn, conv, model, w

from convgraph import load
from convgraph.analysis.analyze import analyze
from convgraph.engine.calibrate import calibrate
from convgraph.optimize import TimingCache, Fitted, candidates, fit_sequential, optimize
from convgraph.optimize.timing import apply_plan, layer_model, span_outputs, unique_names, stats_needed
from convgraph.registry import get_rule
from convgraph.rule import RuleContext
from convgraph.run.runtime import create_session, expose_tensors, run
from helpers import FAST, smooth_feeds


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def bottleneck(c=8, hw=16):
    """A YOLOv8 bottleneck: cv1 1×1 → BN → SiLU → cv2 3×3 → SiLU, added to its input (the residual Add keeps
    cv2's channels: only cv1 can be pruned, refitting cv2)."""
    parts = [conv("cv1", "x", "a", w(c, c, 1, 1), np.zeros(c)), bn("bn1", "a", "b", c),
             helper.make_node("Sigmoid", ["b"], ["s"], name="sig1"), helper.make_node("Mul", ["b", "s"], ["d"], name="silu1"),
             conv("cv2", "d", "e", w(c, c, 3, 3, seed=2), np.zeros(c)),
             helper.make_node("Sigmoid", ["e"], ["t"], name="sig2"), helper.make_node("Mul", ["e", "t"], ["f"], name="silu2"),
             helper.make_node("Add", ["x", "f"], ["y"], name="res")]
    return model(parts, ["y"], c_in=c, hw=hw)


def records(cg):
    return {r.node_id: r for r in analyze(cg, rewrites=False).convs}


def span_of(cg, by_id, node, keep=0.5):
    rule = get_rule("prune")
    params = rule.resolve_params({"keep": str(keep)})
    ctx = RuleContext(cg, by_id, None, params)
    found = rule.check(by_id[node], ctx)[1]
    return found, rule.make(by_id[node], ctx, params, found)


def test_the_span_model_computes_what_the_span_computes_in_the_model():
    """cv1 → BN → SiLU → cv2, cut out as a model of its own: input cv1's input, output cv2's output, the same
    values as in the whole model (onnxruntime); the pruned replacement is a valid model of the same interface."""
    m = bottleneck()
    cg = load(m)
    by_id = records(cg)
    found, rep = span_of(cg, by_id, "cv1")
    assert list(found.nodes) == ["cv1", "bn1", "sig1", "silu1", "cv2"]
    outs = span_outputs(cg, found.nodes)
    assert outs == ["e"]
    before = layer_model(cg, by_id["cv1"], [cg.node(n) for n in found.nodes], [], outs)
    after = layer_model(cg, by_id["cv1"], rep.nodes, rep.initializers, outs)
    for layer in (before, after):
        onnx.checker.check_model(layer, full_check=True)
        assert [i.name for i in layer.graph.input] == ["x"] and [o.name for o in layer.graph.output] == ["e"]
    feed = smooth_feeds(1, 5, shape=(1, 8, 16, 16))[0]
    (whole,) = run(create_session(expose_tensors(m, ["e"])), feed, ["e"])
    (alone,) = run(create_session(before), feed)
    np.testing.assert_array_equal(alone, whole)
    assert run(create_session(after), feed)[0].shape == whole.shape


def test_a_span_reading_another_activation_takes_it_as_an_input():
    """Nodes that read a tensor neither constant nor made inside (here a Concat with another branch) get it
    as a model input of its shape; timing feeds it random data."""
    parts = [conv("p", "x", "a", w(6, 4, 3, 3)), conv("o", "x", "b", w(2, 4, 1, 1)),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"), conv("q", "c", "y", w(3, 8, 1, 1))]
    m = model(parts, ["y"])
    cg = load(m)
    by_id = records(cg)
    span = ["p", "cat", "q"]
    layer = layer_model(cg, by_id["p"], [cg.node(n) for n in span], [], span_outputs(cg, span))
    onnx.checker.check_model(layer, full_check=True)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in layer.graph.input}
    assert shapes == {"x": [1, 4, 12, 12], "b": [1, 2, 12, 12]}
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 12, 12)).astype(np.float32)}
    got = run(create_session(expose_tensors(m, ["b"])), feed, ["y", "b"])
    np.testing.assert_allclose(run(create_session(layer), {**feed, "b": got[1]})[0], got[0], rtol=1e-6, atol=1e-6)
    from convgraph.run.bench import bench

    assert bench([layer], runs=2, warmup=1, progress=False).models[0].median_ms > 0


def test_prune_candidates_are_the_span_timed_against_its_replacement(tmp_path, monkeypatch):
    """On a bottleneck: prune of cv1 at every keep share, touching cv1..cv2, MACs of both convs before and
    after; none for cv2 (its channels meet the residual Add); the timings cached under a key from the layers'
    structure, so a second run times nothing."""
    cg = load(bottleneck())
    recs = list(records(cg).values())
    path = tmp_path / "t.json"

    def run_(cache):
        return candidates(cg, recs, ["prune", "separable"], (1,), provider="cpu", threads=1, runs=4, warmup=1,
                          cache=cache)

    cold = TimingCache(path)
    got = run_(cold)
    prune = [c for c in got if c.rule == "prune"]
    assert sorted(c.params["keep"] for c in prune) == [0.25, 0.5, 0.75]
    assert all(c.node == "cv1" and c.touches == ["cv1", "bn1", "sig1", "silu1", "cv2"] for c in prune)
    full = 8 * 8 * 256 + 8 * 8 * 9 * 256
    assert all(c.macs_before == full and c.macs_after == round(full * c.params["keep"]) for c in prune)
    assert all(c.layer_ms_before > 0 and c.layer_ms_after > 0 for c in prune)
    assert {c.node for c in got if c.rule == "separable"} == {"cv2"} and all(
        not c.touches for c in got if c.rule == "separable")
    assert (cold.hits, cold.misses) == (0, 2)  # cv1's span, cv2 alone
    cold.save()

    def never(*a, **kw):
        raise AssertionError("timed although cached")

    monkeypatch.setattr(importlib.import_module("convgraph.run.bench"), "bench", never)
    warm = TimingCache(path)
    again = run_(warm)
    assert (warm.hits, warm.misses) == (2, 0)
    assert [(c.layer_ms_before, c.layer_ms_after) for c in again] == [(c.layer_ms_before, c.layer_ms_after) for c in got]


def test_prune_needs_its_consumers_statistics():
    cg = load(bottleneck())
    by_id = records(cg)
    assert stats_needed(cg, by_id, "cv1", "prune", {"keep": 0.5}) == ["cv2"]
    assert stats_needed(cg, by_id, "cv2", "separable", {"rank": 1}) == ["cv2"]
    assert stats_needed(cg, by_id, "cv2", "prune", {"keep": 0.5}) == []  # no match: nothing to fit


def test_a_prune_candidate_alone_is_spliced_in_as_the_engine_would_build_it(models_dir):
    """sample.onnx's stem → Relu → block1/conv and block1 → BN → Relu → depthwise → BN → Relu → block2/pw:
    the pruned span spliced in place of its last node gives what the engine gives, exactly."""
    from convgraph.optimize import Candidate

    cg = load(models_dir / "sample.onnx")
    unique_names(cg)
    original = cg.to_model()
    by_id = records(cg)
    feeds = smooth_feeds(3, 30)
    for node in ("stem/conv", "block1/conv"):
        stats = calibrate(original, feeds, nodes=stats_needed(cg, by_id, node, "prune", {"keep": 0.5}))
        c = Candidate(node, "prune", {"keep": 0.5}, "", None, None, 1.0, 0.5)
        fitted = Fitted(original, cg, by_id, stats, None)
        assert fitted.place(fitted.rep(c), node) is not None  # spliced in, not built by the engine
        fast = fitted.model({node: ("prune", {"keep": 0.5})})[0]
        slow, (change,) = apply_plan(original, {node: ("prune", {"keep": 0.5})}, calibration=stats, input_shapes=None)
        assert "least squares" in change.notes
        onnx.checker.check_model(fast, full_check=True)
        a, b = run(create_session(fast), feeds[0]), run(create_session(slow), feeds[0])
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_fit_sequential_calibrates_the_consumers_of_a_pruned_conv(models_dir, monkeypatch):
    import convgraph.optimize.sequential as seq

    original = load(models_dir / "sample.onnx").to_model()
    calls = []
    real = seq.calibrate
    monkeypatch.setattr(seq, "calibrate", lambda *a, **kw: calls.append(kw["nodes"]) or real(*a, **kw))
    plan = {"stem/conv": ("prune", {"keep": 0.5}), "block4/conv5x5": ("separable", {"rank": 1})}
    m, changes = fit_sequential(original, plan, smooth_feeds(4, 31))
    onnx.checker.check_model(m, full_check=True)
    assert calls == [["block1/conv"], ["block4/conv5x5"]]
    assert "least squares on calibration patches" in next(c for c in changes if c.rule == "prune").notes


def test_optimize_chooses_prune_within_the_budget(models_dir):
    path = models_dir / "sample.onnx"
    calib, held = smooth_feeds(8, 2), smooth_feeds(3, 3)
    m, report = optimize(path, calib, held, budget=0.99, rules=["prune"], **FAST)
    onnx.checker.check_model(m, full_check=True)
    assert report.passed and report.chosen and all(c.rule == "prune" for c in report.chosen)
    ref = [run(create_session(str(path)), f)[0] for f in held]
    got = [run(create_session(m), f)[0] for f in held]
    from convgraph.run.metrics import compare

    assert compare(ref, got).cosine == pytest.approx(report.metric_value, abs=1e-9) and report.metric_value >= 0.99
    touched = [set(next(c for c in report.candidates if (c.node, c.rule, c.params) == (ch.node, ch.rule, ch.params))
                   .touches) for ch in report.chosen]
    assert all(not (a & b) for i, a in enumerate(touched) for b in touched[i + 1:])  # no two spans overlap
    convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}
    assert all("pruned_W" in convs[n].input[1] for t in touched for n in t if n in convs)  # consumers refitted too
    assert sum(n in convs for t in touched for n in t) >= 2 * len(touched)
