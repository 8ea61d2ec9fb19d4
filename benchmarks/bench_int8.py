"""int8 side by side, in one run: fp32, onnxruntime's own ``quantize_static`` of every conv (MinMax, Percentile,
Entropy), ``convgraph optimize`` without int8 and ``convgraph optimize`` with int8 among its rules.

Per model: YOLOv8n 320 (nudenet; judged on its class scores ``/model.22/Sigmoid_output_0`` and the NMS F1 of its
detections per image) and PP-OCRv4 det 640 (its text map on images with text, BGR as rapidocr feeds it). Every
variant is calibrated on the same arrays (crops of scikit-image photos; for PP-OCR det half of them synthetic text
pages) and judged per image on images outside every calibration set (YOLOv8n: other skimage photos and
matplotlib's sample photos; PP-OCR det: skimage's page and text and synthetic pages of another seed), each also
zoomed out, zoomed in and (photos) mirrored. ``optimize``
runs as the CLI does, at its default settings apart from ``--rules``, in a child process whose wall time and peak
RSS are reported (``--heldout`` is not given: it splits its own off the calibration set). Speed: interleaved
against fp32, at 1 thread and at onnxruntime's default threads.

    python benchmarks/bench_int8.py                              # both models, every variant
    python benchmarks/bench_int8.py --models yolov8n --no-optimize    # only onnxruntime's quantizer
    python benchmarks/bench_int8.py --boundaries yolov8n         # a Q→DQ boundary against each int8 conv
    python benchmarks/bench_int8.py --frontier yolov8n           # k int8 units, least error alone first
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimize import (  # noqa: E402 - the benchmark helpers beside this file
    FIT_SOURCES, HELD_OUT, MODELS, TEXT_IMAGES, box_iou, crops_folder, detection_f1, detections, input_set,
    link_folder, outputs, text_images,
)

from convgraph import load, zoo  # noqa: E402
from convgraph.run.bench import bench  # noqa: E402

#: YOLOv8n's held-out images beside skimage's: matplotlib's sample photos (in no calibration set).
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def matplotlib_data() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"


#: What each model is judged on (besides the outputs).
JUDGED = {"yolov8n": "/model.22/Sigmoid_output_0", "ppocr-det": None}


def arrays(model: onnx.ModelProto, folder: Path, spec, dest: Path) -> tuple[Path, list[dict]]:
    """The samples of an image folder as the model takes them, saved as one .npz (the CLI's --calib)."""
    data = input_set(model, folder, spec)
    feeds = [data[i] for i in range(len(data))]
    stacked: dict[str, np.ndarray] = {spec[0]: np.concatenate([f[spec[0]] for f in feeds])}
    np.savez(dest, allow_pickle=False, **stacked)
    return dest, feeds


def ort_quantized(fp32: Path, feeds: list[dict], method: str, dest: Path) -> Path:
    """onnxruntime's quantizer as its docs show it: quant_pre_process, then quantize_static of every conv (QDQ,
    per-channel int8 weights, uint8 activations); opset raised to 13 first where lower (per-channel
    DequantizeLinear needs its axis)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    m = onnx.load(fp32)
    if max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
        m = onnx.version_converter.convert_version(m, 13)
    src = dest.with_suffix(".fp32.onnx")
    onnx.save(m, src)
    pre = dest.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print; stdout is the table
        quantize_static(str(pre), str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                        calibrate_method=getattr(CalibrationMethod, method))
    return dest


#: Runs ``python -m convgraph ARGS`` and writes its peak RSS in bytes to the file $PEAK_TO: the largest of its own
#: (VmHWM, which starts anew at exec) and its children's (the fit processes it forks). The wait4 figure of a child
#: of this benchmark is no good: a forked child's peak starts at this process's RSS, gigabytes after the quantizers.
PEAK_WRAPPER = """
import os, resource, runpy, sys
sys.argv = ["convgraph", *sys.argv[1:]]
try:
    runpy.run_module("convgraph", run_name="__main__")
finally:
    own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["PEAK_TO"], "w") as f:
        f.write(str(max(own, kids) * 1024))
"""


def optimized(fp32: Path, calib: Path, rules: str, dest: Path, log: Path) -> tuple[Path | None, dict, float, float]:
    """``convgraph optimize`` in a child process: (model or None, its --json report, wall s, peak RSS GB)."""
    cmd = [sys.executable, "-c", PEAK_WRAPPER, "optimize", str(fp32), "--calib", str(calib), "--rules", rules,
           "-o", str(dest), "--json"]
    peak = log.with_suffix(".peak")
    t = time.perf_counter()
    with open(log, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ,
                                                                                          "PEAK_TO": str(peak)})
    wall = time.perf_counter() - t
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"summary": f"no report (exit {done.returncode}; see {log})"}
    rss = int(peak.read_text()) / 2**30 if peak.exists() else float("nan")
    return (dest if dest.exists() else None), report, wall, rss


def judge(name: str, fp32: onnx.ModelProto, model: onnx.ModelProto, held: list[dict]) -> dict:
    """Per held-out image: the cosine of what matters (worst), and for YOLOv8n its detections' F1 (worst) and the
    worst cosine among the images on which fp32 detects something (on the others the class scores are all near 0,
    and their cosine measures noise the detections never see) and the worst IoU of one of fp32's boxes with the
    candidate's best box of its class."""
    from convgraph.run.metrics import compare

    tensor = JUDGED[name] or fp32.graph.output[0].name
    names = [tensor] + ([fp32.graph.output[0].name] if name == "yolov8n" else [])
    ref, got = outputs(fp32, held, names), outputs(model, held, names)
    m = compare(ref[tensor], got[tensor])
    row = {"cosine": m.cosine, "worst": m.worst_sample}
    if name == "yolov8n":
        out = names[1]
        found = [detections(r) for r in ref[out]]
        boxes = [detections(g) for g in got[out]]
        row["f1"] = min(detection_f1(d, b) for d, b in zip(found, boxes))
        ious = [float(box_iou(rb[k:k + 1], gb[gc == rc[k]])[0].max()) if (gc == rc[k]).any() else 0.0
                for (rb, _, rc), (gb, _, gc) in zip(found, boxes) for k in range(len(rb))]
        row["iou"] = min(ious, default=None)
        seen = [i for i, d in enumerate(found) if len(d[0])]
        row["detected"] = compare([ref[tensor][i] for i in seen], [got[tensor][i] for i in seen]).cosine if seen else None
    return row


def boundaries(name: str, runs: int) -> None:
    """What a boundary between int8 and float costs: per conv of ``name``, a QuantizeLinear → DequantizeLinear
    pair on its input (uint8, the calibrated scale does not matter) timed against the conv's int8 unit (Q, the
    QLinearConv and its activation, DQ) and the same layers in float, at 1 thread, interleaved."""
    from onnx import TensorProto, helper

    from convgraph.analysis.analyze import analyze
    from convgraph.optimize import TimingCache, candidates
    from convgraph.optimize.timing import unique_names

    spec = MODELS[name]
    cg = load(zoo.fetch(name), {spec[0]: [1, 3, spec[1], spec[1]]}, probe=True)
    recs = analyze(cg, rewrites=False).convs
    unique_names(cg)
    cands = {c.node: c for c in candidates(cg, recs, ["int8"], [1], provider="cpu", threads=1, runs=runs, warmup=3,
                                           cache=TimingCache(TimingCache.default_path()))}
    rows: list[tuple[str, tuple, float, float, float]] = []
    for r in recs:
        if r.node_id not in cands or r.input_shape is None:
            continue
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(r.input_shape))
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(r.input_shape))
        g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq", [x], [y],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
                               helper.make_tensor("z", TensorProto.UINT8, [], [128])])
        qdq = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        b = bench([qdq], runs=runs, warmup=3, threads=1, progress=False)
        c = cands[r.node_id]
        rows.append((r.node_id, r.input_shape, b.models[0].median_ms, c.layer_ms_after, c.layer_ms_before))
    print("| conv | input | Q→DQ of its input, ms | int8 unit (Q, QLinearConv + activation, DQ), ms | float, ms |")
    print("|---|---|---|---|---|")
    for node, shape, qdq_ms, int8_ms, fp_ms in rows:
        print(f"| {node} | {'×'.join(map(str, shape))} | {qdq_ms:.3f} | {int8_ms:.3f} | {fp_ms:.3f} |")
    tot = [sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows)]
    print(f"| all {len(rows)} | | {tot[0]:.2f} | {tot[1]:.2f} | {tot[2]:.2f} |")


def with_variants(folder: Path, mirror: bool) -> Path:
    """``folder``'s images and, beside each, the same scene zoomed out (75%, on grey as a letterbox pads it),
    zoomed in (its middle two thirds) and, with ``mirror``, mirrored: more images outside every calibration set
    (a budget held on 8 photos held on them at 0.9975, on their variants at 0.987-0.990)."""
    from PIL import Image, ImageOps

    for path in sorted(folder.iterdir()):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            out = Image.new("RGB", (w, h), (114, 114, 114))
            out.paste(im.resize((w * 3 // 4, h * 3 // 4)), (w // 8, h // 8))
            out.save(folder / f"{path.stem}.zoom-out.png")
            im.crop((w // 6, h // 6, w - w // 6, h - h // 6)).save(folder / f"{path.stem}.zoom-in.png")
            if mirror:
                ImageOps.mirror(im).save(folder / f"{path.stem}.mirrored.png")
    return folder


def prepare(name: str, n_calib: int, tmp: Path) -> tuple[onnx.ModelProto, Path, Path, list[dict], list[dict]]:
    """The model with a static input (saved as ``fp32.onnx``), its calibration images as arrays (and .npz) and
    its held-out images' arrays: (model, its path, calib .npz, calib feeds, held-out feeds)."""
    spec = MODELS[name]
    inp, size = spec[0], spec[1]
    cg = load(zoo.fetch(name), {inp: [1, 3, size, size]})
    fp32_model = cg.to_model()
    dims = fp32_model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, size, size)):
        d.Clear()
        d.dim_value = v  # static: onnxruntime's quantizer and the CLI need no --input-shape
    fp32 = tmp / "fp32.onnx"
    onnx.save(fp32_model, fp32)
    folder = crops_folder(tmp / "calib", FIT_SOURCES, n_calib - (n_calib // 2 if name == "ppocr-det" else 0), size)
    if name == "ppocr-det":
        text_images(folder, n_calib // 2, size)
        held_folder = text_images(link_folder(tmp / "held", TEXT_IMAGES), 6, size, seed=1000)
    else:
        held_folder = link_folder(tmp / "held", HELD_OUT)
        for photo in MATPLOTLIB_PHOTOS:  # photos from another package: a person, a product, a logo
            os.symlink(matplotlib_data() / photo, held_folder / photo)
    with_variants(held_folder, mirror=name != "ppocr-det")  # text is not read mirrored
    calib_npz, calib = arrays(fp32_model, folder, spec, tmp / "calib.npz")
    _, held = arrays(fp32_model, held_folder, spec, tmp / "held.npz")
    return fp32_model, fp32, calib_npz, calib, held


def frontier(name: str, n_calib: int, runs: int, counts: list[int], activation: str = "int8") -> None:
    """What int8 alone can reach, on the model ``optimize`` searches (its exact pre-passes applied) and judged as it
    judges: every int8 unit's error alone (MinMax ranges on the fit part of the calibration set, judged on its
    split-off quarter on the outputs and what they add a constant grid to), then the first k units in that order
    quantized together as the optimizer builds a plan (joins included): speed at 1 thread against fp32, the worst
    split-off sample (the figure ``optimize`` holds at its margin), and on the held-out images the worst cosine of
    what matters, the worst among images with a detection and the worst box IoU. ``activation="float"``: the units
    are the convs alone."""
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.rewrite import rewrite
    from convgraph.optimize import int8
    from convgraph.optimize.fitting import Fitted
    from convgraph.optimize.judge import Judge
    from convgraph.optimize.report import DEFAULT_RULES
    from convgraph.optimize.timing import unique_names
    from convgraph.registry import get_rule
    from convgraph.run import offsets

    with tempfile.TemporaryDirectory() as tmp_:
        model, _, _, calib, held = prepare(name, n_calib, Path(tmp_))
    fit = [f for i, f in enumerate(calib) if i % 4 != 3]
    split = [f for i, f in enumerate(calib) if i % 4 == 3]
    cg = load(model)
    unique_names(cg)
    reference = cg.to_model()
    exact = [r for r in DEFAULT_RULES if get_rule(r).prepass]
    pre = rewrite(reference, exact, verify=True).model or reference
    cg = load(pre, probe=True)
    recs = analyze(cg, rewrites=False).convs
    original = cg.to_model()
    tensors = [o.name for o in reference.graph.output] + list(offsets.offset_roots(reference))
    split_judge = Judge(reference, split, "cosine", "cpu", None, tensors)
    given = {"calibration": "minmax", "activation": activation}
    params = get_rule("int8").resolve_params(given)
    ranges = int8.calibrate(original, cg, [(r, params) for r in recs], fit)
    fitted = Fitted(original, cg, {r.node_id: r for r in recs}, None, None, ranges)
    step = ("int8", given)
    errors = {r.node_id: split_judge.judge(fitted.model({r.node_id: step})[0])[1] for r in recs}
    order = sorted(errors, key=lambda n: errors[n])
    print(f"{name}: {len(recs)} convs after {', '.join(exact)}; judged on {', '.join(tensors)}")
    print("| int8 units | speed-up, 1 thread | split-off samples, worst | held-out images, worst | with a detection, "
          "worst | worst box IoU |")
    print("|---|---|---|---|---|---|")
    for k in [c for c in counts if c <= len(order)] + [len(order)]:
        m = fitted.model({n: step for n in order[:k]})[0]
        b = bench([reference, m], runs=runs, warmup=3, threads=1, progress=False)
        row = judge(name, reference, m, held)
        cells = [f"{row[c]:.4f}" if row.get(c) is not None else "—" for c in ("cosine", "detected", "iou")]
        print(f"| {k} | {b.ratios[0].median:.2f}× | {split_judge.judge(m)[0]:.4f} | {' | '.join(cells)} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="yolov8n,ppocr-det")
    ap.add_argument("--calib", type=int, default=32, help="calibration images")
    ap.add_argument("--runs", type=int, default=100, help="interleaved timed runs per model")
    ap.add_argument("--no-optimize", action="store_true", help="only fp32 and onnxruntime's quantizer")
    ap.add_argument("--rules", default="fuse-hardswish,fold-bn,softmax-conv,split-conv,separable,spatial-separable,dilated,low-rank")
    ap.add_argument("--keep", help="folder to keep the models and logs in")
    ap.add_argument("--boundaries", metavar="MODEL", help="only what an int8/float boundary costs, per conv")
    ap.add_argument("--frontier", metavar="MODEL", help="only what int8 units can reach, in order of their errors")
    ap.add_argument("--counts", default="20,30,40,50,60", help="--frontier: the numbers of int8 units built")
    ap.add_argument("--activation", default="int8", choices=("int8", "float"),
                    help="--frontier: the activations after the convs in int8 with them, or left float")
    args = ap.parse_args(argv)
    if args.boundaries:
        boundaries(args.boundaries, args.runs)
        return 0
    if args.frontier:
        frontier(args.frontier, args.calib, args.runs, [int(c) for c in args.counts.split(",")], args.activation)
        return 0
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp_:
            tmp = Path(args.keep or tmp_) / name
            tmp.mkdir(parents=True, exist_ok=True)
            fp32_model, fp32, calib_npz, calib, held = prepare(name, args.calib, tmp)
            variants: list[tuple[str, onnx.ModelProto, str]] = []
            for method in ("MinMax", "Percentile", "Entropy"):
                t = time.perf_counter()
                q = ort_quantized(fp32, calib, method, tmp / f"ort-{method}.onnx")
                variants.append((f"onnxruntime quantize_static, {method}", onnx.load(q),
                                 f"{time.perf_counter() - t:.0f} s"))
            if not args.no_optimize:
                for label, rules in (("convgraph optimize, no int8", args.rules),
                                     ("convgraph optimize, with int8", args.rules + ",int8")):
                    stem = label.split(",", 1)[1].strip()
                    out, rep, wall, rss = optimized(fp32, calib_npz, rules, tmp / f"{stem}.onnx", tmp / f"{stem}.log")
                    print(f"{name}: {label}: {rep.get('summary')}", file=sys.stderr, flush=True)
                    variants.append((label, onnx.load(out) if out else fp32_model,
                                     f"{wall:.0f} s, {rss:.2f} GB" + ("" if out else " (nothing written)")))
            one = bench([fp32_model] + [v[1] for v in variants], runs=args.runs, warmup=5, threads=1,
                        names=["fp32"] + [v[0] for v in variants], progress=False)
            many = bench([fp32_model] + [v[1] for v in variants], runs=args.runs, warmup=5, threads=None,
                         names=["fp32"] + [v[0] for v in variants], progress=False)
            rows.append((name, "fp32", one.models[0].median_ms, 1.0, many.models[0].median_ms, 1.0,
                         {"cosine": 1.0, **dict.fromkeys(("f1", "detected", "iou"), 1.0 if name == "yolov8n" else None)},
                         "—"))
            for k, (label, model, cost) in enumerate(variants):
                rows.append((name, label, one.models[k + 1].median_ms, one.ratios[k].median,
                             many.models[k + 1].median_ms, many.ratios[k].median, judge(name, fp32_model, model, held),
                             cost))
    cores = os.cpu_count()
    print("\n| model | variant | 1 thread: ms (speed-up) | "
          f"{cores} threads: ms (speed-up) | worst held-out image: cosine | worst image with a detection: cosine "
          "| worst image: detections' F1 | worst box: IoU | search / quantize time, peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, ms1, r1, msn, rn, j, cost in rows:
        f1, seen, iou = ("—" if j.get(k) is None else f"{j[k]:.{d}f}" for k, d in (("f1", 3), ("detected", 4), ("iou", 3)))
        print(f"| {name} | {label} | {ms1:.2f} ({r1:.2f}×) | {msn:.2f} ({rn:.2f}×) | {j['cosine']:.4f} | {seen} | {f1} "
              f"| {iou} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
