"""benchmarks/bench_optimize.py's detection figures: YOLOv8 decoding, class-wise NMS and F1 matching."""

from __future__ import annotations

import numpy as np
import pytest

from bench_optimize import box_iou, detection_f1, detections


def yolo_output(anchors, classes=3) -> np.ndarray:
    """[1, 4 + classes, N] from (cx, cy, w, h, class, score) per anchor (the other classes score 0.01)."""
    out = np.full((1, 4 + classes, len(anchors)), 0.01, np.float32)
    for i, (cx, cy, w, h, k, s) in enumerate(anchors):
        out[0, :4, i] = cx, cy, w, h
        out[0, 4 + k, i] = s
    return out


def test_decoding_keeps_confident_boxes_and_suppresses_overlaps_per_class():
    out = yolo_output([(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 0, 0.8),  # IoU 0.82 with the first: suppressed
                       (50, 50, 20, 20, 1, 0.7),  # the same place, another class: kept
                       (58, 50, 20, 20, 0, 0.6),  # IoU 0.43 with the first: kept
                       (10, 10, 8, 8, 2, 0.2)])  # under 0.25: dropped
    boxes, scores, classes = detections(out)
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6], rtol=1e-6)
    assert classes.tolist() == [0, 1, 0]
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])
    assert box_iou(boxes[:1], boxes[2:]) == pytest.approx(12 * 20 / (2 * 400 - 12 * 20))


def test_f1_matches_same_class_boxes_greedily_by_score():
    box = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)
    ref = (box, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 2]))
    got = (np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [44, 44, 54, 54]], float),
           np.array([0.5, 0.6, 0.9, 0.8]), np.array([0, 0, 2, 2]))
    # [1, 0, 11, 10] (score 0.6, IoU 0.82) takes the class-0 box before the exact one (0.5); the class-2 box at
    # [20..30] overlaps nothing of its class; [44..54] overlaps class 2's box at IoU 36/164 < 0.5
    assert detection_f1(ref, got) == pytest.approx(2 * 1 / (3 + 4))
    assert detection_f1(ref, ref) == 1.0
    none = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
    assert detection_f1(none, none) == 1.0 and detection_f1(ref, none) == 0.0 and detection_f1(none, got) == 0.0
