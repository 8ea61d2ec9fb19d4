"""int8 of every conv, per calibration method: convgraph's ``int8`` rule against onnxruntime's own ``quantize_static``.

Each image judged alone on what matters, on images that no calibration set contains: YOLOv8n 320's class scores
(``/model.22/Sigmoid_output_0``) on skimage's held-out photos and pages, PP-OCR det 640's text map on images with
text (skimage's page and text, and synthetic pages drawn with another seed than the calibration's). Calibration as
``bench_optimize.py`` makes it: crops and flips of other skimage photos (and synthetic text pages for PP-OCR det).
The worst image decides which method is the rule's default. ``--speed`` also times each model against fp32 at one
thread (interleaved runs, ``convgraph.bench``)::

    python benchmarks/bench_int8_calibration.py                       # both models, every method, fidelity
    python benchmarks/bench_int8_calibration.py --models yolov8n --speed
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimize import (  # noqa: E402 - the same images, calibration sets and helpers as the optimizer's benchmark
    FIT_SOURCES, HELD_OUT, MODELS, TEXT_IMAGES, crops_folder, input_set, link_folder, outputs, text_images,
)

from convgraph import load, zoo  # noqa: E402
from convgraph.run.bench import bench  # noqa: E402
from convgraph.engine.quantize import ensure_opset  # noqa: E402
from convgraph.engine.rewrite import rewrite  # noqa: E402

METHODS = ("minmax", "percentile", "entropy")
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def ort_quantize(model: onnx.ModelProto, calib, method: str, tmp: Path) -> onnx.ModelProto:
    """onnxruntime's quantize_static of every conv, as its documentation shows it: quant_pre_process, then QDQ,
    per-channel int8 weights, uint8 activations, the method's default settings."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            self.i += 1
            return calib[self.i - 1]

    src, pre, dst = tmp / "in.onnx", tmp / "pre.onnx", tmp / f"ort.{method}.onnx"
    onnx.save(ensure_opset(model)[0], src)
    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress: keep the table clean
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]))
    return onnx.load(dst)


def per_image(ref: dict, got: dict, tensor: str) -> list[float]:
    out = []
    for a, b in zip(ref[tensor], got[tensor]):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        out.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="yolov8n,ppocr-det")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib", type=int, default=32, help="calibration images")
    ap.add_argument("--text-calib", type=int, default=16, help="of them, synthetic text pages (PP-OCR det only)")
    ap.add_argument("--text-heldout", type=int, default=6, help="synthetic held-out pages (PP-OCR det)")
    ap.add_argument("--speed", action="store_true", help="also time each model against fp32 at one thread")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--only", choices=("convgraph", "onnxruntime"), help="one quantizer only")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        inp, size = spec[0], spec[1]
        path = zoo.fetch(name)
        shapes = {inp: [1, 3, size, size]}
        original = load(path, shapes).to_model()
        text = name == "ppocr-det"
        tensor = spec[5][0] if spec[5] else original.graph.output[0].name
        with tempfile.TemporaryDirectory() as tmp:
            folder = crops_folder(Path(tmp) / "calib", FIT_SOURCES, args.calib - (args.text_calib if text else 0), size)
            if text:
                text_images(folder, args.text_calib, size)
                held_dir = text_images(link_folder(Path(tmp) / "held", TEXT_IMAGES), args.text_heldout, size, seed=1000)
            else:
                held_dir = link_folder(Path(tmp) / "held", HELD_OUT)
            calib, held = input_set(original, folder, spec), input_set(original, held_dir, spec)
            names = sorted(p.name for p in held_dir.iterdir())
            ref = outputs(original, list(held), [tensor])
            for method in args.methods.split(","):
                for who in [args.only] if args.only else ("convgraph", "onnxruntime"):
                    t = time.perf_counter()
                    if who == "convgraph":
                        model = rewrite(path, ["int8"], params={"calibration": method}, calib=calib,
                                        input_shapes=shapes, verify=False).model
                    else:
                        model = ort_quantize(original, calib, method, Path(tmp))
                    seconds = time.perf_counter() - t
                    cos = per_image(ref, outputs(model, list(held), [tensor]), tensor)
                    worst = int(np.argmin(cos))
                    row = {"model": name, "who": who, "method": method, "worst": cos[worst], "at": names[worst],
                           "median": float(np.median(cos)), "seconds": seconds, "all": cos}
                    if args.speed:
                        b = bench([original, model], runs=args.runs, threads=1, input_shapes=shapes,
                                  names=["fp32", "int8"], progress=False)
                        row["speedup"] = b.ratios[0].median
                    rows.append(row)
                    print(f"{name} {who} {method}: worst {cos[worst]:.4f} ({names[worst]}), "
                          + " ".join(f"{c:.3f}" for c in cos) + f" [{seconds:.0f} s]", file=sys.stderr, flush=True)
    print("\n| model | quantizer | calibration | worst held-out image: cosine (image) | median | "
          + ("speed-up at 1 thread | " if args.speed else "") + "quantizing took |")
    print("|---|---|---|---|---|" + ("---|" if args.speed else "") + "---|")
    for r in rows:
        speed = f"{r['speedup']:.2f}× | " if args.speed else ""
        print(f"| {r['model']} | {r['who']} | {r['method']} | {r['worst']:.4f} ({r['at']}) | {r['median']:.4f} | "
              f"{speed}{r['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
