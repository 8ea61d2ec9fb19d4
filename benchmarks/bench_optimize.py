"""The error–latency table of ``convgraph optimize`` on real models and real images.

For YOLOv8n (nudenet, 1×3×320×320, RGB/255) and PP-OCRv4 det (1×3×640×640, BGR, (x/255 − 0.5)/0.5 as
rapidocr feeds it): calibration on crops and flips of scikit-image's sample photos, the budget checked
on other sample images (never fitted on), then per budget: the measured CPU speed-up (onnxruntime,
interleaved pairs) at 1 thread and at all threads, the search's own held-out figure (with ``--split`` taken
on every 4th calibration crop, so that its gap to the other sources shows), the output cosine on the
other sources' worst image (per image, not pooled), for YOLOv8n the cosine
of the class scores (the decoded box output hides them: its cosine is dominated by anchor positions),
for PP-OCR det the IoU of the text map binarized at 0.3 against the original's on skimage's ``text`` and
``page`` images, and for YOLOv8n the detections themselves: decoded (boxes whose best class scores 0.25 or
more, class-wise NMS at IoU 0.45) and matched to the original's per image (same class, IoU ≥ 0.5, greedy by
score), their F1 on the worst image and on average.

    python benchmarks/bench_optimize.py                       # both models, budgets 0.999 0.995 0.99 0.98
    python benchmarks/bench_optimize.py --models yolov8n --budgets 0.99 --calib 16
    python benchmarks/bench_optimize.py --models yolov8n --budgets 0.99 --split    # the search's figure vs others
    /usr/bin/time -v python benchmarks/bench_optimize.py --calibrate-only ppocr-det --calib 64   # memory
    python benchmarks/bench_optimize.py --layers yolov8n --calib 16     # weight vs data fits, per layer
    python benchmarks/bench_optimize.py --coverage yolov8n,ppocr-det   # the coverage check, thinner calibration sets
    python benchmarks/bench_optimize.py --estimates yolov8n --ranks 1,2   # estimated vs judged candidate errors
    python benchmarks/bench_optimize.py --layers yolov8n --low-rank --calib 48   # low-rank vs the others, equal MACs
    python benchmarks/bench_optimize.py --layers yolov8n --activation --calib 32  # post- vs pre-activation fits

Every budget of a model reuses the first run's candidate measurements (``optimize(measured=...)``).
onnxruntime's int8 beside ``optimize`` with and without int8, in one run: ``bench_int8.py`` beside this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convgraph import load, zoo
from convgraph.run.bench import bench
from convgraph.run.inputs import InputSet, make_inputs
from convgraph.optimize import optimize, plot_pareto
from convgraph.run.runtime import create_session, expose_tensors, run
from convgraph.run.metrics import compare

#: Sources of the calibration crops; the held-out images below are never fitted on.
FIT_SOURCES = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
               "hubble_deep_field.jpg", "ihc.png", "brick.png", "grass.png", "gravel.png",
               "coins.png", "moon.png", "logo.png", "color.png", "clock_motion.png", "cell.png", "microaneurysms.png")
HELD_OUT = ("camera.png", "motorcycle_right.png", "horse.png", "page.png", "text.png")
TEXT_IMAGES = ("page.png", "text.png")

MODELS = {
    # name: (input, size, mean, std, BGR, judged tensors besides the outputs)
    "yolov8n": ("images", 320, None, None, False, ["/model.22/Sigmoid_output_0"]),
    "ppocr-det": ("x", 640, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], True, []),
}


def skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def crops_folder(dest: Path, names, count: int, size: int, seed: int = 0) -> Path:
    """``count`` images made from ``names``: the whole image, then random square crops (30–100% of the
    short side), horizontal flips and, one time in three, grey (the held-out set has grey photos: a
    calibration set must cover what the model will see), each resized to ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    data = skimage_data()
    for i in range(count):
        name = names[i % len(names)]
        with Image.open(data / name) as im:
            im = im.convert("RGB")
            if i >= len(names):
                w, h = im.size
                side = int(min(w, h) * rng.uniform(0.3, 1.0))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                im = im.crop((x, y, x + side, y + side))
                if rng.random() < 0.5:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if rng.random() < 1 / 3:
                    im = im.convert("L").convert("RGB")
            im.resize((size, size), Image.Resampling.BILINEAR).save(dest / f"{i:03d}_{Path(name).stem}.png")
    return dest


WORDS = ("the", "of", "calibration", "onnx", "model", "conv", "layer", "text", "page", "2024", "speed", "error",
         "budget", "data", "image", "scikit", "detector", "line", "word", "42", "A4", "Table", "Figure", "(3)")


def text_images(dest: Path, count: int, size: int, seed: int = 1) -> Path:
    """``count`` synthetic text images: lines of random words in Pillow's default font at random sizes,
    dark on light or light on dark, over a plain or noisy background (a text detector's calibration set
    needs text; the held-out text images are never used)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        bg = rng.integers(150, 256, 3) if rng.random() < 0.7 else rng.integers(0, 90, 3)
        fg = (255 - bg + rng.integers(-40, 40, 3)).clip(0, 255)
        noise = rng.normal(0, rng.uniform(0, 12), (size, size, 3))
        im = Image.fromarray((np.full((size, size, 3), bg, np.float64) + noise).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        y = int(rng.integers(0, size // 8))
        while y < size:
            px = int(rng.integers(10, 48))
            font = ImageFont.load_default(size=px)
            line = " ".join(rng.choice(WORDS, int(rng.integers(1, 9))))
            draw.text((int(rng.integers(0, size // 4)), y), line, font=font, fill=tuple(int(v) for v in fg))
            y += int(px * rng.uniform(1.3, 3.0))
        im.save(dest / f"text_{i:03d}.png")
    return dest


def link_folder(dest: Path, names) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        os.symlink(skimage_data() / n, dest / n)
    return dest


def input_set(model, folder: Path, spec) -> InputSet:
    name, size, mean, std, bgr, _ = spec
    data = make_inputs(model, str(folder), input_shapes={name: [1, 3, size, size]}, image_size=(size, size),
                       mean=mean, std=std)
    if not bgr:
        return data
    return InputSet(len(data), lambda i: {name: np.ascontiguousarray(data[i][name][:, ::-1])}, data.describe + ", BGR",
                    data.specs)


def outputs(model, feeds, names) -> dict[str, list[np.ndarray]]:
    sess = create_session(expose_tensors(model, names))
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, run(sess, f, names)):
            got[n].append(v)
    return got


def text_iou(ref: list[np.ndarray], cand: list[np.ndarray], thresh: float = 0.3) -> list[float]:
    out = []
    for r, c in zip(ref, cand):
        a, b = r > thresh, c > thresh
        union = np.count_nonzero(a | b)
        out.append(np.count_nonzero(a & b) / union if union else 1.0)
    return out


def detections(out: np.ndarray, score: float = 0.25, iou: float = 0.45) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes x1 y1 x2 y2, scores, classes) of a YOLOv8 output [1, 4 + classes, anchors] (cx, cy, w, h, then
    the class scores): the anchors whose best class scores at least ``score``, after class-wise NMS at ``iou``."""
    p = np.asarray(out, np.float64)[0]
    cls, sc = p[4:].argmax(0), p[4:].max(0)
    keep = sc >= score
    cx, cy, w, h = p[:4, keep]
    boxes, sc, cls = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), sc[keep], cls[keep]
    chosen: list[int] = []
    for k in np.unique(cls):
        idx = np.flatnonzero(cls == k)
        idx = idx[np.argsort(-sc[idx], kind="stable")]
        while len(idx):
            chosen.append(idx[0])
            idx = idx[1:][box_iou(boxes[idx[:1]], boxes[idx[1:]])[0] <= iou]
    order = np.array(sorted(chosen, key=lambda i: -sc[i]), int)
    return boxes[order], sc[order], cls[order]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), x1 y1 x2 y2."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(x: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)


def detection_f1(ref, got, iou: float = 0.5) -> float:
    """F1 of detections ``got`` against ``ref`` (each (boxes, scores, classes)): ``got``'s boxes in order of
    score each match the unmatched ``ref`` box of its class that overlaps it most, at IoU ``iou`` or more;
    1.0 when neither has a box."""
    (rb, _, rc), (gb, gs, gc) = ref, got
    if not len(rb) and not len(gb):
        return 1.0
    free, tp = np.ones(len(rb), bool), 0
    ious = box_iou(gb, rb) if len(rb) and len(gb) else np.zeros((len(gb), len(rb)))
    for i in np.argsort(-gs, kind="stable"):
        cand = np.where(free & (rc == gc[i]) & (ious[i] >= iou), ious[i], -1.0)
        if len(cand) and cand.max() >= 0:
            free[int(cand.argmax())] = False
            tp += 1
    return 2 * tp / (len(rb) + len(gb))


def calibrate_only(name: str, count: int) -> None:
    """Calibration statistics of every conv over ``count`` images (for /usr/bin/time -v)."""
    from convgraph.engine.calibrate import calibrate

    spec = MODELS[name]
    path = zoo.fetch(name)
    cg = load(path, {spec[0]: [1, 3, spec[1], spec[1]]})
    with tempfile.TemporaryDirectory() as tmp:
        calib = input_set(cg.to_model(), crops_folder(Path(tmp) / "calib", FIT_SOURCES, count, spec[1]), spec)
        t = time.perf_counter()
        stats = calibrate(cg, calib)
        dt = time.perf_counter() - t
    mb = sum(a.nbytes for s in stats.values() for a in (s.sum, s.sq, s.full) if a is not None) / 2**20
    print(f"{name}: {len(stats)} convs calibrated over {stats.info['batches']} images at {spec[1]}×{spec[1]} in "
          f"{dt:.1f} s; statistics {mb:.0f} MiB")


def layer_fits(name: str, count: int) -> None:
    """Per standard conv: held-out relative output error of the layer alone, weight SVD vs data-aware fits
    (whitened SVD only, then the method chosen on held-out calibration batches), separable rank 1 and 4."""
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibrate
    from convgraph.fit.calibration import patches
    from convgraph.fit import separable_fit
    from convgraph.model.weights import constant_value

    spec = MODELS[name]
    cg = load(zoo.fetch(name), {spec[0]: [1, 3, spec[1], spec[1]]})
    model = cg.to_model()
    recs = [r for r in analyze(cg, rewrites=False).convs if r.kind == "standard"]
    with tempfile.TemporaryDirectory() as tmp:
        calib = input_set(model, crops_folder(Path(tmp) / "calib", FIT_SOURCES, count, spec[1]), spec)
        held = input_set(model, link_folder(Path(tmp) / "held", HELD_OUT), spec)
        stats = calibrate(cg, calib, nodes=[r.node_id for r in recs])
        acts = outputs(model, list(held), sorted({r.input for r in recs}))

    def out(x, w, b, r):
        p = patches(x.astype(np.float64), r.kernel, r.strides, r.pads, r.dilations)
        return np.einsum("nchwij,ocij->nohw", p, w) + b[None, :, None, None]

    print("| conv | C_in→C_out | rank 1: weights / whitened / chosen | rank 4: weights / whitened / chosen |")
    print("|---|---|---|---|")
    cols = []
    for r in recs:
        wv, bv = constant_value(cg, r.weight), constant_value(cg, r.bias) if r.bias else None
        if wv is None or bv is None:  # YOLOv8n's and PP-OCR det's 3×3 convs all have constant weights and bias
            continue
        w, b = wv.astype(np.float64), bv.astype(np.float64)
        x = np.concatenate(acts[r.input])
        y = out(x, w, b, r)
        row = []
        for rank in (1, 4):
            for st, iters in ((None, 0), (stats[r.node_id], 0), (stats[r.node_id], 4)):
                f = separable_fit(w, b, rank, st, als_iters=iters)
                row.append(float(np.linalg.norm(out(x, f.weight(r.kernel, 1), f.bias, r) - y) / np.linalg.norm(y)))
        cols.append(row)
        print(f"| {r.node_id} | {r.in_channels}→{r.out_channels} | " + " / ".join(f"{v:.3f}" for v in row[:3])
              + " | " + " / ".join(f"{v:.3f}" for v in row[3:]) + " |")
    med = np.median(np.array(cols), axis=0)
    print(f"| median of {len(cols)} | | " + " / ".join(f"{v:.3f}" for v in med[:3]) + " | "
          + " / ".join(f"{v:.3f}" for v in med[3:]) + " |")


def low_rank_layers(name: str, count: int) -> None:
    """Per 3×3 standard conv, at equal MACs: held-out relative output error of the layer alone (the rules'
    rewrites run in onnxruntime on the held-out activations), all fitted on calibration data: separable rank 1
    against low-rank at the largest rank within its MACs, spatial-separable rank 1 likewise."""
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibrate
    from convgraph.optimize.timing import layer_model
    from convgraph.registry import get_rule
    from convgraph.rule import RuleContext
    from convgraph.rules.low_rank import full_rank

    spec = MODELS[name]
    cg = load(zoo.fetch(name), {spec[0]: [1, 3, spec[1], spec[1]]})
    model = cg.to_model()
    recs = [r for r in analyze(cg, rewrites=False).convs if r.kind == "standard" and r.kernel == (3, 3)]
    by_id = {r.node_id: r for r in recs}
    with tempfile.TemporaryDirectory() as tmp:
        calib = input_set(model, crops_folder(Path(tmp) / "calib", FIT_SOURCES, count, spec[1]), spec)
        held = input_set(model, link_folder(Path(tmp) / "held", HELD_OUT), spec)
        stats = calibrate(cg, calib, nodes=list(by_id))
        acts = outputs(model, list(held), sorted({r.input for r in recs}))
    low = get_rule("low-rank")

    def layer(rec, ref, rule, params):
        """(held-out relative output error against ``ref``, MACs) of ``rule`` on ``rec``, fitted on the statistics."""
        r = get_rule(rule)
        p = r.resolve_params({k: str(v) for k, v in params.items()})
        rep = r.build(rec, RuleContext(cg, by_id, stats, p), p)  # every 3×3 standard conv matches all three
        sess = create_session(layer_model(cg, rec, rep.nodes, rep.initializers))
        got = np.concatenate([sess.run(None, {rec.input: x})[0] for x in acts[rec.input]])
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), rep.macs_after

    def equal_macs(rec, form, macs):
        """The largest low-rank rank of ``form`` whose MACs are within ``macs`` (at least 1)."""
        best = 1
        for rank in range(1, full_rank(rec, form) + 1):
            m = low.estimate(rec, {"rank": rank, "form": form, "fit": "data"})[0]
            if m > macs:
                break
            best = rank
        return best

    print("| conv | C_in→C_out | separable r1: MACs, error | low-rank spatial (R), channel (R) | "
          "spatial-separable r1: MACs, error | low-rank spatial (R), channel (R) |")
    print("|---|---|---|---|---|---|")
    cols = []
    for rec in recs:
        original = create_session(layer_model(cg, rec, [cg.node(rec.node_id)], []))
        ref = np.concatenate([original.run(None, {rec.input: x})[0] for x in acts[rec.input]])
        row, cells = [], []
        for rule in ("separable", "spatial-separable"):
            err, macs = layer(rec, ref, rule, {"rank": 1})
            found = {}
            for form in ("spatial", "channel"):
                rank = equal_macs(rec, form, macs)
                found[form] = (layer(rec, ref, "low-rank", {"rank": rank, "form": form})[0], rank)
            row += [err, found["spatial"][0], found["channel"][0]]
            cells += [f"{macs / rec.macs:.3f}, {err:.3f}",
                      f"{found['spatial'][0]:.3f} ({found['spatial'][1]}), {found['channel'][0]:.3f} "
                      f"({found['channel'][1]})"]
        cols.append(row)
        print(f"| {rec.node_id} | {rec.in_channels}→{rec.out_channels} | " + " | ".join(cells) + " |", flush=True)
    med = np.median(np.array(cols), axis=0)
    print(f"| median of {len(cols)} | | {med[0]:.3f} | {med[1]:.3f}, {med[2]:.3f} | {med[3]:.3f} | "
          f"{med[4]:.3f}, {med[5]:.3f} |")



def coverage_table(names) -> None:
    """The optimizer's coverage check (``OptimizeReport.coverage``) of calibration sets made of fewer and
    fewer photos against the held-out images."""
    from convgraph.analysis.analyze import analyze
    from convgraph.optimize.phases import input_coverage

    print("| model | calibration set | coverage of the held-out images | at tensor |")
    print("|---|---|---|---|")
    for name in names:
        spec = MODELS[name]
        cg = load(zoo.fetch(name), {spec[0]: [1, 3, spec[1], spec[1]]})
        model, recs = cg.to_model(), analyze(cg, rewrites=False).convs
        with tempfile.TemporaryDirectory() as tmp:
            held = input_set(model, link_folder(Path(tmp) / "held", HELD_OUT), spec)
            for label, sources, count in (("32 crops of 1 photo", FIT_SOURCES[1:2], 32),
                                          ("32 crops of 3 photos", FIT_SOURCES[:3], 32),
                                          ("32 crops of 8 photos", FIT_SOURCES[:8], 32),
                                          ("32 crops of 18 photos", FIT_SOURCES, 32),
                                          ("18 whole photos", FIT_SOURCES, 18)):
                calib = input_set(model, crops_folder(Path(tmp) / label.replace(" ", "_"), sources, count, spec[1]),
                                  spec)
                got = input_coverage(model, recs, calib, held, "cpu")
                print(f"| {name} | {label} | " + (f"{got[0]:.2f} | {got[1]} |" if got else "— | no conv input |"),
                      flush=True)


def estimates(name: str, count: int, ranks) -> None:
    """The optimizer's estimated candidate errors (two judged per conv, the rest scaled from layer errors)
    against every candidate judged in the whole model."""
    from scipy.stats import spearmanr

    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibratable, calibrate
    from convgraph.optimize import Judge, layer_errors, Fitted, candidate_key, scale_errors, candidates
    from convgraph.optimize.report import STABLE_SHARE
    from convgraph.optimize.timing import unique_names

    spec = MODELS[name]
    shapes = {spec[0]: [1, 3, spec[1], spec[1]]}
    cg = load(zoo.fetch(name), shapes)
    recs = [r for r in analyze(cg, rewrites=False).convs if not r.graph]
    unique_names(cg)
    model = cg.to_model()
    with tempfile.TemporaryDirectory() as tmp:
        calib = input_set(model, crops_folder(Path(tmp) / "calib", FIT_SOURCES, count, spec[1]), spec)
        feeds = list(calib)
    judge = Judge(model, feeds[::4], "cosine", "cpu", None, [o.name for o in model.graph.output] + spec[5],
                  strict=False)
    cands = [c for c in candidates(cg, recs, ["separable", "spatial-separable", "dilated", "low-rank"], ranks,
                                   provider="cpu", threads=1, runs=20, warmup=3)
             if c.saving_ms > 0 and c.faster_share is not None and c.faster_share >= STABLE_SHARE]
    by_id = {r.node_id: r for r in recs}
    stats = calibrate(model, [f for i, f in enumerate(feeds) if i % 4], input_shapes=shapes,
                      nodes=sorted({c.node for c in cands if calibratable(by_id[c.node]) is None}))
    fitted = Fitted(model, cg, by_id, stats, shapes)
    cands = [c for c in cands if fitted.rep(c) is not None]
    judged = {candidate_key(c.node, c.rule, c.params) for c in layer_errors(fitted, cands, judge, lambda *_: None)}
    truth = {candidate_key(c.node, c.rule, c.params): judge.judge(fitted.model({c.node: (c.rule, c.params)})[0])[1]
             for c in cands}
    for c in cands:
        c.error = truth[candidate_key(c.node, c.rule, c.params)] if candidate_key(c.node, c.rule, c.params) in judged else None
    scale_errors(cands)
    pairs = np.array([(truth[candidate_key(c.node, c.rule, c.params)], c.error) for c in cands if c.estimated])
    ratio = pairs[:, 1] / np.maximum(pairs[:, 0], 1e-12)
    print(f"{name}: {len(cands)} candidates, {len(judged)} judged, {len(pairs)} estimated: Spearman "
          f"{spearmanr(pairs[:, 0], pairs[:, 1]).statistic:.3f}, estimate/judged median {np.median(ratio):.2f}, "
          f"10th–90th percentile {np.quantile(ratio, 0.1):.2f}–{np.quantile(ratio, 0.9):.2f}")


def _chain_model(cg, rec, nodes, inits, act):
    """A model of ``nodes`` (the conv or its replacement) followed by the ops of activation ``act``: input the
    conv's input, output the activation's (pointwise: the conv output's shape)."""
    from dataclasses import replace

    from convgraph.optimize.timing import layer_model

    return layer_model(cg, replace(rec, output=act.output), list(nodes) + [cg.node(v) for v in act.nodes], inits)


#: (rule, params) compared by --activation, each with response=pre and response=post.
ACTIVATION_FITS = (("low-rank", {"rank": "1/4"}), ("low-rank", {"rank": "1/8"}), ("separable", {"rank": 1}),
                   ("separable", {"rank": 2}))


def activation_layers(name: str, count: int) -> None:
    """Per conv that feeds an activation: held-out relative error after the activation of the layer alone (the
    rewrite and the activation's ops run in onnxruntime on the held-out activations, against the original's),
    fitted to the conv's output (response=pre) and to the activation's (response=post), at equal rank; first,
    for YOLOv8n, the worst held-out image's output cosine with every standard 3×3 conv at low-rank 1/4 and 1/2
    (fitted on the original model's statistics, all at once)."""
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibrate
    from convgraph.fit import activation_of
    from convgraph.registry import get_rule
    from convgraph.engine.rewrite import Selection, rewrite
    from convgraph.rule import RuleContext

    spec = MODELS[name]
    cg = load(zoo.fetch(name), {spec[0]: [1, 3, spec[1], spec[1]]})
    model = cg.to_model()
    acts = {r.node_id: a for r in analyze(cg, rewrites=False).convs if (a := activation_of(cg, r.node_id))}
    ctx0 = RuleContext(cg)
    recs = [r for r in analyze(cg, rewrites=False).convs if r.node_id in acts
            and get_rule("low-rank").match(r, ctx0) is None]
    by_id = {r.node_id: r for r in recs}
    std3 = [r.node_id for r in recs if r.kind == "standard" and r.kernel == (3, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        calib = input_set(model, crops_folder(Path(tmp) / "calib", FIT_SOURCES, count, spec[1]), spec)
        held = input_set(model, link_folder(Path(tmp) / "held", HELD_OUT), spec)
        stats = calibrate(cg, calib, nodes=list(by_id))
        feeds = list(held)
        xs = outputs(model, feeds, sorted({r.input for r in recs}))
        if name == "yolov8n":
            tensors = [o.name for o in model.graph.output] + spec[5]
            ref_out = outputs(model, feeds, tensors)
            for share in ("1/4", "1/2"):
                whole = {}
                for response in ("pre", "post"):
                    new = rewrite(cg, ["low-rank"], params={"rank": share, "response": response},
                                  selection=Selection(node_ids=std3), input_shapes={spec[0]: [1, 3, spec[1], spec[1]]},
                                  calibration=stats, verify=False).model
                    got = outputs(new, feeds, tensors)
                    whole[response] = [min(compare([a], [b]).cosine for a, b in zip(ref_out[t], got[t]))
                                       for t in tensors]
                print(f"YOLOv8n, all {len(std3)} standard 3×3 convs at low-rank {share}, worst held-out image's "
                      f"cosine ({', '.join(tensors)}): pre " + ", ".join(f"{v:.4f}" for v in whole["pre"])
                      + "; post " + ", ".join(f"{v:.4f}" for v in whole["post"]) + "\n", flush=True)

    def chain_error(rec, ref, rule, params):
        r = get_rule(rule)
        p = r.resolve_params({k: str(v) for k, v in params.items()})
        rep = r.build(rec, RuleContext(cg, by_id, stats, p), p)
        sess = create_session(_chain_model(cg, rec, rep.nodes, rep.initializers, acts[rec.node_id]))
        got = np.concatenate([sess.run(None, {rec.input: x})[0] for x in xs[rec.input]])
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    head = " | ".join(f"{rule} {p['rank']}" for rule, p in ACTIVATION_FITS)
    print(f"| conv | C_in→C_out, kernel | activation | {head} (each: pre / post) |")
    print("|---|---|---|" + "---|" * len(ACTIVATION_FITS))
    cols = []
    for rec in recs:
        act = acts[rec.node_id]
        ref_sess = create_session(_chain_model(cg, rec, [cg.node(rec.node_id)], [], act))
        ref = np.concatenate([ref_sess.run(None, {rec.input: x})[0] for x in xs[rec.input]])
        row, cells = [], []
        for rule, params in ACTIVATION_FITS:
            if rule == "separable" and rec.kernel == (1, 1):
                row += [np.nan, np.nan]
                cells.append("–")
                continue
            pair = [chain_error(rec, ref, rule, {**params, "response": resp}) for resp in ("pre", "post")]
            row += pair
            cells.append(f"{pair[0]:.4f} / {pair[1]:.4f}")
        cols.append(row)
        print(f"| {rec.node_id} | {rec.in_channels}→{rec.out_channels}, {'×'.join(map(str, rec.kernel))} | "
              f"{act.describe} | " + " | ".join(cells) + " |", flush=True)
    errs = np.array(cols)
    med = np.nanmedian(errs, axis=0)
    wins = [int(np.sum(errs[:, i + 1] < errs[:, i])) for i in range(0, errs.shape[1], 2)]
    n = [int(np.sum(~np.isnan(errs[:, i]))) for i in range(0, errs.shape[1], 2)]
    print(f"| median of {len(cols)} | | | " + " | ".join(
        f"{med[i]:.4f} / {med[i + 1]:.4f} (post lower on {wins[i // 2]} of {n[i // 2]})"
        for i in range(0, errs.shape[1], 2)) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="yolov8n,ppocr-det")
    ap.add_argument("--budgets", default="0.999,0.995,0.99,0.98")
    ap.add_argument("--calib", type=int, default=32, help="calibration images (crops of the sources)")
    ap.add_argument("--rules", default="separable,spatial-separable,dilated,low-rank")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--max-evals", type=int, default=12)
    ap.add_argument("--plot", help="folder for the Pareto PNGs")
    ap.add_argument("--save", help="folder to pickle each OptimizeReport into")
    ap.add_argument("--calibrate-only", metavar="MODEL", help="only calibrate MODEL (memory measurement)")
    ap.add_argument("--layers", metavar="MODEL", help="only compare weight and data fits layer by layer")
    ap.add_argument("--low-rank", action="store_true",
                    help="with --layers: low-rank against separable and spatial-separable at equal MACs instead")
    ap.add_argument("--activation", action="store_true",
                    help="with --layers: fits to the output after the activation against fits to the conv's output")
    ap.add_argument("--text-calib", type=int, default=0,
                    help="of the --calib images, this many are synthetic text (for the text detector)")
    ap.add_argument("--split", action="store_true",
                    help="the search holds out every 4th calibration crop (its own figure) instead of the other "
                         "sources, which are then only reported: the gap between the two shows")
    ap.add_argument("--quantile", type=float, help="hold the budget on this share of the held-out images")
    ap.add_argument("--time-budget", type=float, help="seconds per optimize run")
    ap.add_argument("--text-heldout", type=int, default=0,
                    help="hold the budget on images with text instead: skimage's page and text and this many "
                         "synthetic pages (another seed than --text-calib's); the other sources are still reported")
    ap.add_argument("--coverage", metavar="MODELS", help="only the coverage check of thinner calibration sets")
    ap.add_argument("--estimates", metavar="MODEL", help="only estimated vs judged candidate errors")
    ap.add_argument("--outputs-only", action="store_true",
                    help="judge the budget on the model outputs alone (the extra tensors are still reported)")
    args = ap.parse_args(argv)
    if args.calibrate_only:
        calibrate_only(args.calibrate_only, args.calib)
        return 0
    if args.coverage:
        coverage_table(args.coverage.split(","))
        return 0
    if args.estimates:
        estimates(args.estimates, args.calib, [int(r) for r in args.ranks.split(",")])
        return 0
    if args.layers:
        (activation_layers if args.activation else low_rank_layers if args.low_rank else layer_fits)(
            args.layers, args.calib)
        return 0
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        inp, size, _, _, _, extra = spec
        path = zoo.fetch(name)
        shapes = {inp: [1, 3, size, size]}
        original = load(path, shapes).to_model()
        tensors = [o.name for o in original.graph.output] + extra
        with tempfile.TemporaryDirectory() as tmp:
            folder = crops_folder(Path(tmp) / "calib", FIT_SOURCES, args.calib - args.text_calib, size)
            if args.text_calib:
                text_images(folder, args.text_calib, size)
            calib = input_set(original, folder, spec)
            held = input_set(original, link_folder(Path(tmp) / "held", HELD_OUT), spec)
            text = input_set(original, link_folder(Path(tmp) / "text", TEXT_IMAGES), spec)
            search_held = held
            if args.text_heldout:  # the budget held on images with text: skimage's two and synthetic pages
                pages = link_folder(Path(tmp) / "text_held", TEXT_IMAGES)
                search_held = input_set(original, text_images(pages, args.text_heldout, size, seed=1000), spec)
            measured = None
            for budget in budgets:
                t = time.perf_counter()
                judged = tensors[:1] if args.outputs_only else tensors
                model, rep = optimize(path, calib, None if args.split else search_held, budget=budget,
                                      quantile=args.quantile, time_budget=args.time_budget, rules=args.rules.split(","),
                                      ranks=[int(r) for r in args.ranks.split(",")], input_shapes=shapes,
                                      tensors=judged, measured=measured, threads=1, max_evals=args.max_evals,
                                      progress=lambda m, at=f"{name} {budget}": print(f"  [{at}] {m}",
                                                                                       file=sys.stderr, flush=True))
                measured = rep.candidates
                if args.save:
                    import pickle

                    Path(args.save).mkdir(parents=True, exist_ok=True)
                    with open(Path(args.save) / f"{name}-{budget}.pkl", "wb") as f:
                        pickle.dump(rep, f)
                all_threads = bench([original, model], runs=30, warmup=3, threads=None, input_shapes=shapes,
                                    names=["original", "optimized"], progress=False)
                ref = outputs(original, list(held), tensors)
                got = outputs(model, list(held), tensors)
                cos = {n: compare(ref[n], got[n]).cosine for n in tensors}
                row = {"model": name, "budget": budget, "rewritten": len(rep.chosen),
                       "ms_1t": (rep.baseline_ms, rep.measured_ms), "speedup_1t": rep.speedup,
                       "predicted_ms": rep.predicted_ms,
                       "speedup_all": all_threads.ratios[0].median,
                       "ms_all": (all_threads.models[0].median_ms, all_threads.models[1].median_ms),
                       "cos_out": cos[tensors[0]], "cos_extra": cos[tensors[1]] if len(tensors) > 1 else None,
                       "search": rep.metric_value, "excluded": sum(len(v) for v in rep.excluded.values()),
                       "seconds": time.perf_counter() - t}
                if name == "yolov8n":  # the detections themselves: decoded, NMS, matched per image
                    out = tensors[0]
                    f1 = [detection_f1(detections(r), detections(g)) for r, g in zip(ref[out], got[out])]
                    row["f1"] = (min(f1), float(np.mean(f1)), sum(len(detections(r)[0]) for r in ref[out]))
                if name == "ppocr-det":
                    out = original.graph.output[0].name
                    row["iou"] = text_iou(outputs(original, list(text), [out])[out],
                                          outputs(model, list(text), [out])[out])
                rows.append(row)
                phases = ", ".join(f"{k} {v:.1f}" for k, v in rep.seconds.items())
                print(f"{name} budget {budget}: {rep.summary()} [{row['seconds']:.0f} s; optimize: {phases} s]",
                      file=sys.stderr, flush=True)
                for p in rep.points:
                    print(f"  {p.steps} steps, {p.convs} convs ({p.fit}): {p.speedup:.3f}×, {rep.metric} {p.metric:.5f}"
                          f"{'' if p.passed else ' (over budget)'}", file=sys.stderr)
                if args.plot:
                    Path(args.plot).mkdir(parents=True, exist_ok=True)
                    plot_pareto(rep, Path(args.plot) / f"{name}-{budget}.png")
    threads = os.cpu_count()
    print(f"\n| model | budget (held-out cosine ≥) | convs rewritten | 1 thread: ms → ms (speed-up) | predicted ms "
          f"| {threads} threads: ms → ms (speed-up) | search's own held-out figure (samples left out) "
          f"| other sources, worst image: output cosine | class-score cosine / text-map IoU@0.3 (page, text) "
          f"| detections' F1 per image, worst / mean (boxes of the original) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        second = (f"{r['cos_extra']:.4f}" if r["cos_extra"] is not None else
                  " / ".join(f"{v:.3f}" for v in r.get("iou", [])))
        print(f"| {r['model']} | {r['budget']} | {r['rewritten']} | {r['ms_1t'][0]:.1f} → {r['ms_1t'][1]:.1f} "
              f"({r['speedup_1t']:.2f}×) | {r['predicted_ms']:.1f} | {r['ms_all'][0]:.1f} → {r['ms_all'][1]:.1f} "
              f"({r['speedup_all']:.2f}×) | {r['search']:.4f} ({r['excluded']}) | {r['cos_out']:.4f} | {second} | "
              + ("{:.3f} / {:.3f} ({})".format(*r["f1"]) if "f1" in r else "—") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
