#!/usr/bin/env python
"""Rule ``prune`` on YOLOv8n layers: the consumer's output error of the data-aware refit against its ablations.

Usage: ``python benchmarks/bench_prune.py [--keep 0.5] [--size 320] [LAYER ...]``.

Each LAYER (a producer conv; default: three C2f bottlenecks' first convs, each → SiLU → 3×3 conv) is pruned
through the engine (``convgraph.rewrite``), calibrated on four crops each of 8 scikit-image photos and judged
on 6 other photos (resized whole): the relative L2 error of the consumer conv's output (the tensor the
rewrite keeps the name of), for

* ``data``: channels chosen greedily by refitted error, consumer refitted by least squares (the rule's default);
* ``mean``: the same channels, consumer weights unchanged, bias keeping the mean output;
* ``none``: the same channels just dropped;
* ``weights``: channels chosen by weight norms (``fit=weights``), not refitted.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

CALIB = ["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "camera.png",
         "brick.png", "gravel.png"]
HELD_OUT = ["chelsea.png", "retina.jpg", "coins.png", "grass.png", "horse.png", "page.png"]
LAYERS = ["/model.4/m.0/cv1/conv/Conv", "/model.6/m.0/cv1/conv/Conv", "/model.8/m.0/cv1/conv/Conv"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers", nargs="*", default=LAYERS)
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--size", type=int, default=320)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_rule_prune import yolo_crops
    from test_rules_approx import picture

    import convgraph
    import convgraph.rules.prune as prune
    from convgraph.analyze import analyze
    from convgraph.calibrate import calibrate
    from convgraph.rewrite import Selection, rewrite
    from convgraph.registry import get_rule
    from convgraph.rule import RuleContext
    from convgraph.runtime import run_with_outputs
    from convgraph.zoo import fetch

    path, size = str(fetch("yolov8n")), args.size
    shapes = {"images": [1, 3, size, size]}
    crops = yolo_crops(CALIB, size)
    tests = [{"images": picture(n, size, size)} for n in HELD_OUT]
    cg = convgraph.load(path, shapes)
    records = analyze(cg, rewrites=False).convs
    by_name, by_id = {r.name: r for r in records}, {r.node_id: r for r in records}
    rule = get_rule("prune")
    print(f"{'layer':32} {'kept':>9} {'data':>7} {'mean':>7} {'none':>7} {'weights':>8}  notes")
    real_choose = prune._choose
    for layer in args.layers:
        why, found = rule.check(by_name[layer], RuleContext(cg, by_id, params=rule.resolve_params({"keep": args.keep})))
        if why:
            print(f"{layer:32} {why}")
            continue
        consumers = [by_id[n] for n in found["span"].consumers]
        stats = calibrate(path, crops, nodes=[r.node_id for r in consumers], input_shapes=shapes)
        out = consumers[0].output
        (ref,) = run_with_outputs(path, [out], tests).values()
        errors, notes = {}, ""
        for how in ("data", "mean", "none", "weights"):
            def choose(rec, ctx, params, span, ws, how=how):
                dropped, new, means, note = real_choose(rec, ctx, params, span, ws)
                return dropped, (new if how == "data" else ws), (None if how == "none" else means), note

            prune._choose = choose if how in ("mean", "none") else real_choose
            params = {"keep": args.keep, "fit": "weights" if how == "weights" else "data"}
            res = rewrite(path, ["prune"], params=params, selection=Selection(nodes=f"^{layer}$"), input_shapes=shapes,
                          calibration=stats)
            prune._choose = real_choose
            (got,) = run_with_outputs(res.model, [out], tests).values()
            num = sum(np.sum((g - r) ** 2) for g, r in zip(got, ref))
            errors[how] = float(np.sqrt(num / sum(np.sum(r * r) for r in ref)))
            if how == "data":
                notes = res.report.changes[0].notes
        kept = notes.split(" channels")[0].removeprefix("kept ")
        print(f"{layer:32} {kept:>9} {errors['data']:7.3f} {errors['mean']:7.3f} {errors['none']:7.3f} "
              f"{errors['weights']:8.3f}  {notes.split('; ', 1)[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
