"""``analyze --profile``: onnxruntime's kernels mapped back to the convs, through its graph optimizations."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import convgraph
from convgraph.analysis.analyze import analyze
from convgraph.cli import main
from convgraph.analysis.profile import _node_times, attach, profile, saved_ms

ort = pytest.importorskip("onnxruntime")

SAMPLES = ["sample", "conv_bn", "depthwise", "separable_block", "dilated", "grouped", "shuffle", "spatial_separable",
           "standard", "transposed", "quantized", "constant_weights", "conv1d", "conv3d", "pointwise", "subgraph"]
#: Convs no kernel runs for, rightly: the branch of an If that the input does not take.
NOT_RUN = {("subgraph", "then/conv")}


def _check_mapping(cg, prof, model: str) -> None:
    """Every conv got its kernels' time, and every conv kernel of the optimized graph went to a conv."""
    assert prof.unmapped == [] and prof.missing == []
    for (_, nid), t in prof.convs.items():
        if (model, nid) in NOT_RUN:
            assert t.time_ms == 0 and t.kernels == []
        else:
            assert t.time_ms > 0 and t.kernels, (model, prof.opt_level, nid)
    assert len(prof.convs) == len(analyze(cg, rewrites=False).convs)
    kernels = [k for t in prof.convs.values() for k in t.kernels]
    assert len(kernels) == len(set(kernels))  # no kernel counted for two convs


@pytest.mark.parametrize("level", ["all", "basic"])
@pytest.mark.parametrize("model", SAMPLES)
def test_mapping_survives_graph_optimization(models_dir, model, level):
    cg = convgraph.load(models_dir / f"{model}.onnx")
    prof = profile(cg, threads=1, opt_level=level, runs=2, warmup=1)
    _check_mapping(cg, prof, model)


def test_what_onnxruntime_does_to_the_sample_model(models_dir):
    """The facts the mapping rests on, on the sample model: BASIC keeps the convs' names; ALL makes NCHWc convs
    named after their (fused) output tensor, and reorders whose time is charged apart."""
    cg = convgraph.load(models_dir / "sample.onnx")
    basic = profile(cg, threads=1, opt_level="basic", runs=2, warmup=1)
    assert all(t.kernels == [nid] for (_, nid), t in basic.convs.items())
    assert basic.reorder_ms == 0
    full = profile(cg, threads=1, opt_level="all", runs=2, warmup=1)
    nchwc = {nid: t.kernels[0] for (_, nid), t in full.convs.items() if t.kernels[0].endswith("_nchwc")}
    assert nchwc["block1/conv"] == "block1/relu_out_nchwc"  # Conv + Relu fused, named after the Relu's output
    assert nchwc["block2/dw"] == "block2/dw_relu_out_nchwc"
    assert full.reorder_ms > 0
    charged = sum(t.reorder_ms for t in full.convs.values())
    assert 0 < charged <= full.reorder_ms * len(full.convs)


def _unnamed_model() -> onnx.ModelProto:
    """Three convs: two unnamed, two sharing one name."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x = "x"
    for i, name in enumerate(["", "", "dup", "dup"]):
        w = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [8, 8, 3, 3], rng.standard_normal(576).astype(np.float32))
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"y{i}"], name=name, pads=[1, 1, 1, 1]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("level", ["all", "basic", "disable"])
def test_unnamed_and_duplicate_names_map_one_to_one(level):
    cg = convgraph.load(_unnamed_model())
    prof = profile(cg, threads=1, opt_level=level, runs=2, warmup=1)
    assert prof.unmapped == [] and prof.missing == [] and len(prof.convs) == 4
    assert all(t.time_ms > 0 and len(t.kernels) == 1 for t in prof.convs.values())
    assert [n.name for n in cg.model.graph.node] == ["", "", "dup", "dup"]  # the user's graph is left as it was


@pytest.mark.real
@pytest.mark.parametrize("level", ["all", "basic"])
@pytest.mark.parametrize("name, shapes", [("yolov8n", {"images": [1, 3, 320, 320]}),
                                          ("ppocr-det", {"x": [1, 3, 320, 320]})])
def test_mapping_on_real_models(real_models, name, shapes, level):
    cg = convgraph.load(real_models(name), shapes)
    prof = profile(cg, threads=1, opt_level=level, runs=2, warmup=1)
    _check_mapping(cg, prof, name)
    if level == "all" and name == "ppocr-det":  # depthwise + BN + HardSwish/Relu: fused NCHWc names
        kernels = [k for t in prof.convs.values() for k in t.kernels]
        assert sum(k.endswith("_nchwc") for k in kernels) >= 50 and prof.reorder_ms > 0


@pytest.mark.real
def test_yolov8n_convs_add_up_to_the_model_time(real_models):
    """The must-show: at 320×320, 1 thread, every conv gets a time and the convs' time is 50–105% of the model's
    (the run composed of the kernels' medians, which the shares are of)."""
    cg = convgraph.load(real_models("yolov8n"), {"images": [1, 3, 320, 320]})
    a = analyze(cg)
    prof = profile(cg, threads=1, runs=20, warmup=3)
    attach(a, prof)
    assert all(r.time_ms > 0 and r.time_share > 0 for r in a.convs) and len(a.convs) == 64
    share = prof.convs_time_ms / prof.kernels_ms
    print(f"\nyolov8n 320, 1 thread: median run {prof.time_ms:.2f} ms, kernels' medians {prof.kernels_ms:.2f} ms, "
          f"convs {prof.convs_time_ms:.2f} ms ({share:.0%}), reorders {prof.reorder_ms:.2f} ms")
    assert 0.5 <= share <= 1.05 and sum(r.time_share for r in a.convs) == pytest.approx(share)
    # on a quiet machine the shares' total is the median run; a busy one makes the median run longer, never shorter
    assert prof.time_ms >= 0.95 * prof.kernels_ms


def test_attach_fills_the_records(models_dir):
    from convgraph.analysis.roofline import Roofline

    cg = convgraph.load(models_dir / "sample.onnx")
    a = analyze(cg)
    prof = profile(cg, threads=1, runs=3, warmup=1)
    roof = Roofline(50e9, 10e9, "cpu", 1, "m", "now", "x")
    attach(a, prof, roof)
    assert a.totals["time_ms"] == prof.time_ms and a.totals["convs_time_ms"] == prof.convs_time_ms
    assert prof.convs_time_ms == pytest.approx(sum(r.time_ms for r in a.convs))
    parts = prof.convs_time_ms + prof.reorder_ms + sum(prof.other_ms.values())
    assert parts <= prof.kernels_ms and parts == pytest.approx(prof.kernels_ms, rel=0.5)
    for r in a.convs:  # the figures themselves: test_attach_figures_are_the_ones_worked_out_by_hand
        assert r.time_ms == prof.convs[("", r.node_id)].time_ms and 0 < r.time_share < 1
        assert r.gmacs > 0 and r.roofline_gap > 0
        assert all((opt.time_saved_ms > 0) == (opt.macs_after < r.macs) for opt in r.rewrites)
    assert saved_ms(None, 10, 5) is None and saved_ms(2.0, 10, 5) == 1.0


def test_attach_figures_are_the_ones_worked_out_by_hand(models_dir):
    """attach on a profile of given times, against figures worked out by hand (not profile.py's formulas typed
    again): the sample's stem conv (442,368 MACs) takes 0.5 ms of 4 ms of kernels."""
    from convgraph.analysis.profile import ConvTime, Profile
    from convgraph.analysis.roofline import Roofline

    a = analyze(convgraph.load(models_dir / "sample.onnx"))
    stem = a.by_id()["stem/conv"]
    prof = Profile("cpu", 1, "all", 0, 1, "given", "kernel", time_ms=4.2, kernels_ms=4.0, convs_time_ms=0.5,
                   reorder_ms=0.0, other_ms={}, convs={("", stem.node_id): ConvTime(0.5, 0.1, ["stem/conv"])})
    attach(a, prof, Roofline(50e9, 10e9, "cpu", 1, "m", "now", "x"))
    assert stem.time_ms == 0.5 and stem.reorder_ms == 0.1 and stem.time_share == 0.125
    assert stem.gmacs == pytest.approx(0.884736)  # 442,368 MACs in 0.5 ms
    # least time: 1,792 weight + 114,688 activation bytes at 10 GB/s, 11.648 µs (its MACs at 50 GMAC/s: 8.8 µs)
    assert stem.roofline_gap == pytest.approx(0.5 / 0.011648)
    saved = {o.rule: o.time_saved_ms for o in stem.rewrites}
    assert saved["separable"] == pytest.approx(0.5 * 357 / 432)  # 75 of the 432 MACs per output position remain
    assert saved["prune"] == pytest.approx(0.25)  # half its output channels
    assert all(r.time_ms is None and r.gmacs is None for r in a.convs if r is not stem)  # not in the profile
    assert (a.totals["time_ms"], a.totals["kernels_ms"], a.totals["convs_time_ms"]) == (4.2, 4.0, 0.5)


def test_gpu_kernel_events_replace_the_launch_time():
    """A trace with CUDA kernel events (onnxruntime's CUPTI profiler puts them after the node that launched
    them): the node's time is its kernels', not the host's launch time."""
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 10, "dur": 5, "args": {}},
        {"cat": "Kernel", "name": "implicit_gemm", "ts": 20, "dur": 300, "args": {"op_name": "Conv"}},
        {"cat": "Kernel", "name": "add_bias", "ts": 330, "dur": 40, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "relu_kernel_time", "ts": 16, "dur": 4, "args": {}},
        {"cat": "Kernel", "name": "relu", "ts": 380, "dur": 20, "args": {"op_name": "Relu"}},
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 900},
        {"cat": "Node", "name": "conv_kernel_time", "ts": 2010, "dur": 5, "args": {}},
    ]
    runs, per_run, device = _node_times(events, warmup=0)
    assert device and runs == [1.0, 0.9]
    assert per_run[0] == {"conv": pytest.approx(0.34), "relu": pytest.approx(0.02)} and per_run[1] == {"conv": 0.0}
    host = [e for e in events if e["cat"] != "Kernel"]
    runs, per_run, device = _node_times(host, warmup=1)
    assert not device and runs == [0.9] and per_run == [{"conv": 0.005}]


def test_control_flow_nodes_do_not_count_their_bodies_again():
    """onnxruntime's event for an If/Loop/Scan spans the events of its body's nodes: each moment is counted once,
    for the innermost node running then (an If took its branch's convs' time on top of them)."""
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 200}]
    for name, op, ts, dur in (("if", "If", 10, 100), ("inner_loop", "Loop", 20, 60), ("conv_a", "Conv", 25, 20),
                              ("conv_b", "Conv", 50, 20), ("conv_c", "Conv", 85, 20), ("relu", "Relu", 120, 10)):
        events.append({"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}})
    runs, per_run, device = _node_times(events, warmup=0)
    assert per_run[0] == {"if": 20 / 1e3, "inner_loop": 20 / 1e3, "conv_a": 0.02, "conv_b": 0.02, "conv_c": 0.02,
                          "relu": 0.01}
    assert sum(per_run[0].values()) == pytest.approx(0.11)  # the If's span and the Relu: nothing twice


def _loop_model(kind: str) -> onnx.ModelProto:
    """x [1,16,48,48] → a 3×3 conv run 3 times by a Loop (carried), or over a Scan's 3 slices."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.05, "w")
    F = TensorProto.FLOAT
    conv = helper.make_node("Conv", ["s", "w"], ["t"], name="body/conv", pads=[1, 1, 1, 1])
    if kind == "Loop":
        body = helper.make_graph(
            [conv, helper.make_node("Identity", ["c"], ["c_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("c", TensorProto.BOOL, []),
             helper.make_tensor_value_info("s", F, [1, 16, 48, 48])],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("t", F, [1, 16, 48, 48])])
        inits = [w, onnx.numpy_helper.from_array(np.array(3, np.int64), "n"),
                 onnx.numpy_helper.from_array(np.array(True), "go")]
        nodes = [helper.make_node("Loop", ["n", "go", "x"], ["y"], name="loop", body=body)]
        shape = [1, 16, 48, 48]
    else:
        body = helper.make_graph(
            [conv, helper.make_node("Identity", ["acc"], ["acc_out"])], "body",
            [helper.make_tensor_value_info("acc", F, [1]), helper.make_tensor_value_info("s", F, [1, 16, 48, 48])],
            [helper.make_tensor_value_info("acc_out", F, [1]), helper.make_tensor_value_info("t", F, [1, 16, 48, 48])])
        inits = [w, onnx.numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
        nodes = [helper.make_node("Scan", ["zero", "x"], ["acc_end", "y"], name="scan", body=body, num_scan_inputs=1)]
        shape = [3, 1, 16, 48, 48]
    g = helper.make_graph(nodes, kind.lower(), [helper.make_tensor_value_info("x", F, shape)],
                          [helper.make_tensor_value_info("y", F, [None] * len(shape) if kind == "Loop" else shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("kind", ["Loop", "Scan", "If"])
def test_profile_of_loop_scan_and_if_counts_nothing_twice(kind, models_dir):
    """The kernels' medians add up to about the median run (a Loop's whole body counted again made them
    about twice it), and the conv inside gets the body's conv time."""
    if kind == "If":
        cg = convgraph.load(models_dir.parent / "tests" / "data" / "exported" / "reflect_pad_audio.onnx",
                            {"audio": [1, 1, 160000]})
    else:
        cg = convgraph.load(_loop_model(kind))
    prof = profile(cg, threads=1, runs=10, warmup=2)
    body = [t for (path, _), t in prof.convs.items() if path]
    assert body and all(t.time_ms > 0 for t in body)
    parts = prof.convs_time_ms + prof.reorder_ms + sum(prof.other_ms.values())
    assert parts <= 1.02 * prof.kernels_ms and prof.kernels_ms <= 1.25 * prof.time_ms, (kind, parts, prof)
    assert prof.other_ms.get(kind, 0.0) < 0.25 * prof.convs_time_ms  # its own time only: the body's is the convs'


# ---- the CLI ------------------------------------------------------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_profile_json_and_sort_time(capsys, models_dir):
    code, out, err = _run(capsys, str(models_dir / "sample.onnx"), "--profile", "--threads", "1", "--runs", "3",
                          "--json", "--sort", "time")
    doc = json.loads(out)
    assert code == 0 and list(doc) == ["model", "inputs", "symbols", "convs", "totals", "roofline", "profile"]
    times = [c["time_ms"] for c in doc["convs"]]
    assert all(t > 0 for t in times) and times == sorted(times, reverse=True)
    assert doc["totals"]["time_ms"] == doc["profile"]["time_ms"] > 0
    assert doc["profile"]["threads"] == 1 and doc["profile"]["runs"] == 3 and doc["roofline"]["threads"] == 1
    assert all(c["gmacs"] > 0 and 0 < c["time_share"] < 1 for c in doc["convs"])


def test_cli_profile_table_and_markdown(capsys, models_dir):
    code, out, _ = _run(capsys, str(models_dir / "sample.onnx"), "--profile", "--threads", "1", "--runs", "2")
    assert code == 0 and "% time" in out and "GMAC/s" in out and "model " in out and "(est. −" in out
    code, out, _ = _run(capsys, str(models_dir / "sample.onnx"), "--profile", "--threads", "1", "--runs", "2",
                        "--format", "markdown", "--sort", "time", "--top", "2")
    cost, notes = out.split("\n\n")[-2:]
    assert code == 0 and cost.startswith("| name | kind | % MACs |") and "| time ms |" in cost
    assert len(cost.splitlines()) == 4 and notes.startswith("roofline (cpu, 1 thread)") and "model " in notes


def test_cli_inputs_from_npz(capsys, models_dir, tmp_path):
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.random.default_rng(1).standard_normal((2, 1, 3, 32, 32)).astype(np.float32))
    code, out, _ = _run(capsys, str(models_dir / "dynamic.onnx"), "--profile", "--inputs", str(npz), "--json",
                        "--input-shape", "x=1,3,32,32", "--runs", "2")
    doc = json.loads(out)
    assert code == 0 and "2 samples" in doc["profile"]["inputs"] and all(c["time_ms"] > 0 for c in doc["convs"])


@pytest.mark.parametrize("argv, message", [
    (["--sort", "time"], "--profile"),
    (["--profile", "--runs", "0"], "--runs"),
    (["--plot", "MODEL"], "input model"),
    (["--dot", "MODEL"], "input model"),
    (["--threads", "0"], "--threads"),
])
def test_cli_usage_errors(capsys, models_dir, argv, message):
    model = str(models_dir / "standard.onnx")
    code, out, err = _run(capsys, model, *[model if a == "MODEL" else a for a in argv])
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_cli_dynamic_input_without_shape_is_one_line(capsys, models_dir):
    code, out, err = _run(capsys, str(models_dir / "dynamic.onnx"), "--profile")
    assert code == 2 and out == "" and "Traceback" not in err and "--input-shape" in err.splitlines()[-1]


def test_profiling_adds_no_files(capsys, models_dir, tmp_path, monkeypatch):
    """The trace and the optimized model go to a temporary folder that is removed; only what was asked is written."""
    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.onnx"
    model.write_bytes((models_dir / "sample.onnx").read_bytes())
    monkeypatch.chdir(work)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    code, _, _ = _run(capsys, str(model), "--profile", "--runs", "2", "--json")
    assert code == 0 and sorted(os.listdir(work)) == ["m.onnx"] and os.listdir(temp) == []
    code, _, _ = _run(capsys, "m.onnx", "--profile", "--runs", "2", "--plot", "t.png", "--dot", "g.dot")
    assert code == 0 and sorted(os.listdir(work)) == ["g.dot", "m.onnx", "t.png"] and os.listdir(temp) == []
    assert (work / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dot = (work / "g.dot").read_text()
    assert "of time" in dot and "white → red" in dot and 'fillcolor="#ff' in dot


def test_plot_without_matplotlib_is_a_clear_error(capsys, models_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = _run(capsys, str(models_dir / "sample.onnx"), "--plot", str(tmp_path / "t.png"), "--runs", "1")
    assert code == 2 and "pip install 'convgraph[plot]'" in err and not (tmp_path / "t.png").exists()


def test_rewrite_dry_run_estimates_time_saved(capsys, models_dir):
    code = main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "separable", "--dry-run", "--profile",
                 "--threads", "1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["profile"]["time_ms"] > 0
    est = {e["node"]: e for e in doc["time_estimates"]}
    assert set(est) == {c["node"] for c in doc["changes"]}
    # separable rank 1 per output position, by hand: C_in·k² + C_in·C_out MACs of C_in·C_out·k² remain
    share = {"stem/conv": 1 - (27 + 48) / 432, "block1/conv": 1 - (144 + 256) / 2304,
             "block3/dilated": 1 - (216 + 576) / 5184, "block4/conv5x5": 1 - (600 + 384) / 9600}
    assert {c["node"] for c in doc["changes"]} == set(share)
    for c in doc["changes"]:
        e = est[c["node"]]
        assert e["time_ms"] > 0
        assert e["saved_ms_estimate"] == pytest.approx(e["time_ms"] * share[c["node"]])
    code = main(["rewrite", str(models_dir / "sample.onnx"), "--rule", "separable", "--dry-run", "--profile",
                 "--threads", "1"])
    assert code == 0 and "expected time saved" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime has no CUDAExecutionProvider (pip install 'convgraph[cuda]' on a GPU machine)")
def test_profile_on_cuda(capsys, models_dir):
    code, out, err = _run(capsys, str(models_dir / "sample.onnx"), "--profile", "--provider", "cuda", "--json",
                          "--runs", "5")
    doc = json.loads(out)
    assert code == 0 and doc["profile"]["provider"] == "cuda" and doc["profile"]["timing"] in ("kernel", "host")
    assert all(c["time_ms"] is not None for c in doc["convs"]) and doc["profile"]["unmapped"] == []
