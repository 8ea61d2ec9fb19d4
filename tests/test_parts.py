"""Verdicts that see every part of an output: outputs split by scale, each part judged alone (issue 19)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convgraph.run.metrics import PART_GAP, WEAK_SHARE, compare, part_axis, split_parts, weak_notes
from convgraph.engine.verify import verify
from helpers import image_folder, run_cli, write_model


def _detector_output(rng, boxes_scale=150.0, n=2100, classes=18) -> np.ndarray:
    """Like YOLOv8's [1, 4 + classes, anchors]: box coordinates in pixels, then class scores whose channels
    differ a thousandfold among themselves (rare classes), as on real photos."""
    boxes = rng.uniform(0, 2 * boxes_scale, (4, n))
    scores = rng.random((classes, n)) ** 4 * 10.0 ** rng.uniform(-4, -1, (classes, 1))
    return np.concatenate([boxes, scores])[None].astype(np.float32)


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- the split ---------------------------------------------------------------------------------------------------
def test_part_axis_is_the_smallest_after_batch_with_enough_elements():
    assert part_axis((1, 22, 2100)) == 1
    assert part_axis((1, 25200, 85)) == 2  # YOLOv5's layout: boxes and scores along the last axis
    assert part_axis((1, 1, 640, 640)) is None  # a text map: one channel, rows are not parts
    assert part_axis((1, 1000)) is None  # a classifier's logits: one element per slice
    assert part_axis((1, 40, 6625)) == 1
    assert part_axis((7,)) is None


def test_split_finds_boxes_and_scores_but_not_rare_classes():
    rng = np.random.default_rng(0)
    outs = [_detector_output(rng) for _ in range(6)]
    power = np.stack([(o[0].astype(np.float64) ** 2).mean(1) for o in outs])
    assert split_parts(power) == [(0, 4), (4, 22)]
    # the class channels alone (RMS a thousandfold apart, in no order) stay one part
    assert split_parts(power[:, 4:]) == [(0, 18)]


def test_a_split_must_hold_on_every_sample():
    # slices 0-2 louder than 3-5 on one sample, quieter on another: a scene's content, not parts
    power = np.array([[1e4, 1e4, 1e4, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1e4, 1e4, 1e4]])
    assert split_parts(power) == [(0, 6)]
    assert split_parts(power[:1]) == [(0, 3), (3, 6)]
    # just under the gap: no split
    gap = (PART_GAP * 0.9) ** 2
    assert split_parts(np.array([[gap, gap, 1.0, 1.0]])) == [(0, 4)]


# ---- the verdict -------------------------------------------------------------------------------------------------
def test_broken_scores_fail_where_the_pooled_cosine_passes():
    rng = np.random.default_rng(1)
    refs = [_detector_output(rng) for _ in range(4)]
    cands = [r.copy() for r in refs]
    cands[2][0, 4:] = rng.permutation(cands[2][0, 4:].ravel()).reshape(18, -1)  # sample 2's scores destroyed
    for c in cands:
        c[0, :4] += rng.normal(0, 0.5, c[0, :4].shape).astype(np.float32)  # boxes: half a pixel of noise
    m = compare(refs, cands, min_cosine=0.99, name="output0")
    whole = min(_cos(r, c) for r, c in zip(refs, cands))
    assert whole > 0.999  # the boxes hide it in the tensor's cosine
    assert not m.passed and m.verdict == "failed"
    assert m.decided_by == "output0[:, 4:22]"
    assert m.failed_samples == [2] and m.worst_sample == 2
    assert m.cosine == pytest.approx(_cos(refs[2][0, 4:], cands[2][0, 4:]), abs=1e-9)
    boxes, scores = m.parts
    assert (boxes.start, boxes.stop, scores.start, scores.stop) == (0, 4, 4, 22)
    assert boxes.cosine == pytest.approx(min(_cos(r[0, :4], c[0, :4]) for r, c in zip(refs, cands)), abs=1e-9)
    assert json.loads(json.dumps(m.to_dict()))["parts"][1]["name"] == "output0[:, 4:22]"


def test_a_silent_part_is_named_and_left_out():
    rng = np.random.default_rng(2)
    ref = _detector_output(rng)
    ref[0, 4:] = 0.0  # no class score at all: that part says nothing
    cand = ref.copy()
    cand[0, :4] *= 1.001
    m = compare([ref, ref], [cand, cand], min_cosine=0.99, name="out")
    assert m.passed and [p.name for p in m.parts] == ["out[:, 0:4]", "out[:, 4:22]"]
    assert m.parts[1].worst_sample is None and "within" in m.parts[1].degenerate_reason
    assert m.decided_by == "out[:, 0:4]" and not m.degenerate_samples
    ref2 = _detector_output(rng)
    ref2[0, 4:] *= 1e-6  # scores far below the tolerance: silent too, whatever the candidate does there
    m2 = compare([ref2], [ref2 * np.float32(-1.0) ** np.arange(2100)], min_cosine=0.99, name="out")
    assert not m2.passed  # the boxes' signs flipped: the loud part fails
    cand2 = ref2.copy()
    cand2[0, 4:] = 0.0
    assert compare([ref2], [cand2], min_cosine=0.99).passed


def test_classifier_logits_are_judged_as_before():
    rng = np.random.default_rng(3)
    refs = [rng.normal(0, 3, (1, 1000)).astype(np.float32) for _ in range(3)]
    cands = [r + rng.normal(0, 0.3, r.shape).astype(np.float32) for r in refs]
    m = compare(refs, cands, min_cosine=0.99)
    assert not m.parts
    assert m.cosine == pytest.approx(min(_cos(r, c) for r, c in zip(refs, cands)), abs=1e-12)


def test_one_element_cosine_means_nothing_and_is_judged_elementwise():
    m = compare([np.array([2.0])], [np.array([2.774])], min_cosine=0.99, name="score")
    assert not m.passed and math.isnan(m.cosine) and "one element" in m.note
    assert compare([np.array([2.0])], [np.array([2.0000001])], min_cosine=0.99).passed


# ---- a weak deciding sample --------------------------------------------------------------------------------------
def _scores(rng, best: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A detector's class scores whose best is ``best``, and a candidate off by ``noise`` of each score (the
    relative error an int8 model's logit noise makes on small sigmoid scores)."""
    ref = (rng.random((1, 18, 2100)) ** 6 * best).astype(np.float32)
    return ref, (ref * (1 + rng.normal(0, noise, ref.shape))).astype(np.float32)


def test_a_weak_sample_that_decides_the_cosine_is_named():
    rng = np.random.default_rng(5)
    pairs = [_scores(rng, 0.8, 0.01), _scores(rng, 0.02, 0.2), _scores(rng, 0.6, 0.01)]
    m = compare([r for r, _ in pairs], [c for _, c in pairs], min_cosine=0.99, name="scores")
    assert m.worst_sample == 1 and m.sample_top[1] == pytest.approx(float(pairs[1][0].max()))
    i, top, largest = m.weak_worst()
    assert i == 1 and top < WEAK_SHARE * largest and largest == pytest.approx(float(pairs[0][0].max()))
    (note,) = weak_notes([m], ["a.png", "b.png", "c.png"])
    assert note.startswith("scores is decided by b.png") and "only 0.02" in note
    assert json.loads(json.dumps(m.to_dict()))["weak_worst"]["sample"] == 1
    # the worst sample strong: nothing to say; nothing differs: nothing to say
    strong = compare([pairs[0][0], pairs[1][0]], [pairs[0][0] * np.float32(1.3), pairs[1][0]], name="scores")
    assert strong.worst_sample == 0 and strong.weak_worst() is None and not weak_notes([strong])
    assert compare([r for r, _ in pairs], [r for r, _ in pairs]).weak_worst() is None


def test_the_weak_sample_is_judged_in_the_part_that_decides():
    rng = np.random.default_rng(6)
    refs, cands = [], []
    for best in (0.8, 0.02):  # boxes in pixels on both; the second image's scores weak and noisy
        ref = _detector_output(rng)
        ref[0, 4:] = _scores(rng, best, 0)[0][0]
        cand = ref.copy()
        cand[0, 4:] *= (1 + rng.normal(0, 0.2 if best < 0.1 else 0.01, (18, 2100))).astype(np.float32)
        refs.append(ref)
        cands.append(cand)
    m = compare(refs, cands, min_cosine=0.99, name="output0")
    assert m.decided_by == "output0[:, 4:22]" and m.worst_sample == 1
    assert m.weak_worst()[0] == 1  # the whole tensor's largest |value| (boxes, in pixels) would hide it
    assert max(m.sample_top) > 100 and m.parts[1].sample_top[1] < 0.03
    assert weak_notes([m])[0].startswith("output0[:, 4:22] is decided by sample 1")


def test_optimize_judge_and_verify_report_a_weak_deciding_sample(tmp_path, capsys):
    from convgraph.optimize.judge import Judge

    def model(offset: float) -> onnx.ModelProto:  # y = x + offset: an error of the same size on every sample
        g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor("b", TensorProto.FLOAT, [], [offset])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    rng = np.random.default_rng(7)
    feeds = [{"x": (rng.random((1, 4, 8)) * scale).astype(np.float32)} for scale in (1.0, 0.002)]
    value, _, per = Judge(model(0.0), feeds, "cosine", "cpu", None, names=["big", "small"]).judge(model(0.001))
    assert value < 0.99 and per["y"]["distribution"]["worst_sample"] == "small"
    assert per["y"]["weak"].startswith("y is decided by small")
    ref, cand = write_model(tmp_path, model(0.0), "ref.onnx"), write_model(tmp_path, model(0.001), "cand.onnx")
    np.savez(tmp_path / "x.npz", x=np.concatenate([f["x"] for f in feeds]))
    code, _, err = run_cli(capsys, "verify", ref, cand, "--inputs", tmp_path / "x.npz", "--min-cosine", "0.99")
    assert code == 1 and "note: y is decided by sample 1, whose reference reaches only" in " ".join(err.split())


# ---- verify --tensor ---------------------------------------------------------------------------------------------
def _two_layer(scale: float) -> onnx.ModelProto:
    """x → Mul(a) → Mul(scale) → y: the intermediate ``h`` differs between two models when ``a`` does."""
    nodes = [helper.make_node("Mul", ["x", "a"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor("a", TensorProto.FLOAT, [], [scale]),
                           helper.make_tensor("s", TensorProto.FLOAT, [], [1.0 / scale])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_verify_tensor_judges_an_intermediate(tmp_path, capsys):
    ref, cand = write_model(tmp_path, _two_layer(1.0), "ref.onnx"), write_model(tmp_path, _two_layer(2.0), "c.onnx")
    assert verify(ref, cand, samples=2).passed  # the outputs agree
    r = verify(ref, cand, samples=2, tensors=["h"], min_cosine=0.99, atol=1e-3)
    assert not r.passed and list(r.outputs) == ["h"] and r.outputs["h"].failed_samples == [0, 1]
    code, out, _ = run_cli(capsys, "verify", ref, cand, "--samples", "2", "--tensor", "h", "--json")
    d = json.loads(out)
    assert code == 1 and d["tensors"] == ["h"] and d["outputs"]["h"]["failing_samples"] == ["sample 0", "sample 1"]
    renamed = _two_layer(2.0)
    renamed.graph.node[0].output[0] = renamed.graph.node[1].input[0] = "h2"
    code, _, err = run_cli(capsys, "verify", ref, write_model(tmp_path, renamed, "r.onnx"), "--tensor", "h")
    assert code == 2 and "no such tensor in the candidate model" in err and "Traceback" not in err


# ---- the real detector -------------------------------------------------------------------------------------------
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "motorcycle_right.png",
          "logo.png", "clock_motion.png", "rocket.jpg")


@pytest.fixture(scope="module")
def yolo_int8(real_models, tmp_path_factory):
    """YOLOv8n at 320×320 and onnxruntime's own int8 of every conv (QDQ, per-channel, MinMax) calibrated on
    four crops of photos not in PHOTOS."""
    from PIL import Image
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("yolo")
    m = onnx.load(real_models("yolov8n"))
    for i, v in enumerate((1, 3, 320, 320)):
        m.graph.input[0].type.tensor_type.shape.dim[i].dim_value = v
    fp32 = write_model(folder, m, "y.onnx")
    calib = image_folder(folder / "calib", ("horse.png", "hubble_deep_field.jpg", "motorcycle_left.png", "ihc.png"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(sorted(calib.iterdir()))

        def get_next(self):
            p = next(self.it, None)
            if p is None:
                return None
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((320, 320)), np.float32) / 255
            return {"images": a.transpose(2, 0, 1)[None]}

    int8 = folder / "y.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    return fp32, int8, image_folder(folder / "photos", PHOTOS)


@pytest.mark.real
def test_int8_yolo_class_scores_fail_with_and_without_tensor(yolo_int8, capsys):
    fp32, int8, photos = yolo_int8
    common = ["--inputs", str(photos), "--image-size", "320,320", "--min-cosine", "0.99", "--json"]
    code, out, _ = run_cli(capsys, "verify", fp32, int8, "--tensor", "/model.22/Sigmoid_output_0", *common)
    scores = json.loads(out)["outputs"]["/model.22/Sigmoid_output_0"]
    assert code == 1 and scores["verdict"] == "failed" and scores["failing_samples"]
    assert set(scores["failing_samples"]) <= set(PHOTOS) and scores["worst_sample_name"] in PHOTOS
    code, out, _ = run_cli(capsys, "verify", fp32, int8, *common)
    whole = json.loads(out)["outputs"]["output0"]
    assert code == 1 and whole["decided_by"] == "output0[:, 4:22]"
    assert whole["pooled_cosine"] > 0.99  # what the verdict used to pass on
    # the part of output0 that holds the scores is judged exactly as the scores' own tensor
    assert whole["cosine"] == pytest.approx(scores["cosine"], abs=1e-4)
    assert whole["failing_samples"] == scores["failing_samples"]
    code, out, _ = run_cli(capsys, "verify", fp32, fp32, *common)
    assert code == 0 and json.loads(out)["passed"]


def test_exact_checks_scale_errors_by_each_part():
    rng = np.random.default_rng(4)
    ref = _detector_output(rng)
    cand = ref.copy()
    cand[0, 4:] *= np.float32(1.001)  # the scores moved by 1e-3 of themselves; the boxes not at all
    m = compare(ref, cand)
    scores = ref[0, 4:].astype(np.float64)
    assert m.scaled_err == pytest.approx(np.abs(scores * 0.001).max() / np.abs(scores).max(), rel=1e-3)
    assert m.scaled_err > 100 * m.max_abs_err / m.max_abs_ref  # what the whole tensor's scale would have said
