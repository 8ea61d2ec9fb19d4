#!/usr/bin/env python
"""Rule ``prune`` on YOLOv8n layers: the consumer's output error of the data-aware refit against its ablations.

Usage: ``python benchmarks/bench_prune.py [--keep 0.5] [--size 320] [LAYER ...]``.

Each LAYER (a producer conv; default: three C2f bottlenecks' first convs, each → SiLU → 3×3 conv) is pruned
through the engine (``convgraph.engine.rewrite``), calibrated on four crops each of 8 scikit-image photos and judged
on 6 other photos (resized whole): the relative L2 error of the consumer conv's output (the tensor the
rewrite keeps the name of), for

* ``data``: channels chosen greedily by refitted error, consumer refitted by least squares (the rule's default);
* ``mean``: the same channels, consumer weights unchanged, bias keeping the mean output;
* ``none``: the same channels just dropped;
* ``weights``: channels chosen by weight norms (``fit=weights``), not refitted.

``--against-low-rank MODEL [--calib N]`` (yolov8n, ppocr-det): the candidates ``convgraph optimize`` would
weigh, without timing anything: prune at each of ``KEEP_SHARES`` on every conv it can prune, and low-rank at
each of its shares on every conv a pruning touches; each fitted on N calibration crops and its model-level
error alone (1 − cosine on the worst held-out photo, the worst of the judged tensors; spliced into the
model as the optimizer's ``Fitted.model`` builds it) against the MACs it saves. Per keep share: the errors, and prune against the best
low-rank candidate on the same convs that saves at least as many MACs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

CALIB = ["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "camera.png",
         "brick.png", "gravel.png"]
HELD_OUT = ["chelsea.png", "retina.jpg", "coins.png", "grass.png", "horse.png", "page.png"]
LAYERS = ["/model.4/m.0/cv1/conv/Conv", "/model.6/m.0/cv1/conv/Conv", "/model.8/m.0/cv1/conv/Conv"]


def against_low_rank(name: str, count: int) -> None:
    """Prune's candidates against low-rank's on the same convs (errors alone, MACs saved); see the module doc."""
    import tempfile
    from pathlib import Path

    import bench_optimize as bo

    from convgraph import load, zoo
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibrate
    from convgraph.optimize import Candidate, Judge, Fitted
    from convgraph.optimize.timing import rule_options, unique_names, stats_needed
    from convgraph.registry import get_rule
    from convgraph.rule import RuleContext

    spec = bo.MODELS[name]
    shapes = {spec[0]: [1, 3, spec[1], spec[1]]}
    cg = load(zoo.fetch(name), shapes, probe=True)
    unique_names(cg)
    model = cg.to_model()
    by_id = {r.node_id: r for r in analyze(cg, rewrites=False).convs if not r.graph}
    with tempfile.TemporaryDirectory() as tmp:
        calib = list(bo.input_set(model, bo.crops_folder(Path(tmp) / "c", bo.FIT_SOURCES, count, spec[1]), spec))
        held = list(bo.input_set(model, bo.link_folder(Path(tmp) / "h", bo.HELD_OUT), spec))
    judge = Judge(model, held, "cosine", "cpu", None, [o.name for o in model.graph.output] + spec[5], strict=False)
    cands = {}
    for rule in ("prune", "low-rank"):
        r = get_rule(rule)
        for rec in by_id.values():
            for given in rule_options(rule, rec, ()):
                p = r.resolve_params({k: str(v) for k, v in given.items()})
                ctx = RuleContext(cg, by_id, None, p)
                why, found = r.check(rec, ctx)
                if why is not None:
                    break
                rep = r.make(rec, ctx, p, found)
                before = rep.macs_before if rep.macs_before is not None else rec.macs
                if before is not None and rep.macs_after is not None and rep.macs_after <= 0.8 * before:
                    cands[(rec.node_id, rule, repr(given))] = Candidate(
                        rec.node_id, rule, given, rep.kind_after, before, rep.macs_after, 1.0, 0.5,
                        touches=list(found.nodes) if found else [])
    reach = {t for c in cands.values() if c.rule == "prune" for t in c.touches}
    todo = [c for c in cands.values() if c.rule == "prune" or c.node in reach]
    stats = calibrate(model, calib, nodes=sorted({n for c in todo for n in stats_needed(cg, by_id, c.node, c.rule,
                                                                                        c.params)}),
                      input_shapes=shapes)
    fitted = Fitted(model, cg, by_id, stats, shapes)

    def saved(c: Candidate) -> int:  # both counts are known for every candidate made above
        return (c.macs_before or 0) - (c.macs_after or 0)

    def error(c: Candidate) -> float:  # judged below for every candidate in todo
        return c.error if c.error is not None else math.inf

    for i, c in enumerate(todo):
        c.error = judge.judge(fitted.model({c.node: (c.rule, c.params)})[0])[1]
        print(f"{i + 1}/{len(todo)} {c.node} {c.rule} {c.params} saves {saved(c)} MACs: "
              f"error {error(c):.2e}", file=sys.stderr, flush=True)
    low = [c for c in todo if c.rule == "low-rank"]
    print("| keep | convs | error: median (least) | under 0.001 / 0.005 / 0.01 | prune better than the best low-rank "
          "saving ≥ as many MACs on its convs / compared | prune ÷ low-rank error, median |")
    print("|---|---|---|---|---|---|")
    for keep in sorted({c.params["keep"] for c in todo if c.rule == "prune"}, reverse=True):
        ps = [c for c in todo if c.rule == "prune" and c.params["keep"] == keep]
        pairs = [(error(c), min(error(o) for o in alts)) for c in ps
                 if (alts := [o for o in low if o.node in c.touches and saved(o) >= saved(c)])]
        errs = np.array([error(c) for c in ps])
        print(f"| {keep} | {len(ps)} | {np.median(errs):.3g} ({errs.min():.2g}) | "
              + " / ".join(str(int(np.sum(errs < t))) for t in (1e-3, 5e-3, 1e-2))
              + f" | {sum(a < b for a, b in pairs)} / {len(pairs)} | "
              + (f"{np.median([a / max(b, 1e-12) for a, b in pairs]):.2f} |" if pairs else "— |"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layers", nargs="*", default=LAYERS)
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--against-low-rank", metavar="MODEL", help="prune's optimize candidates against low-rank's")
    ap.add_argument("--calib", type=int, default=24, help="with --against-low-rank: calibration crops")
    args = ap.parse_args(argv)
    if args.against_low_rank:
        sys.path.insert(0, os.path.dirname(__file__))
        against_low_rank(args.against_low_rank, args.calib)
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_rule_prune import yolo_crops
    from test_rules_approx import picture

    import convgraph
    import convgraph.rules.prune as prune
    from convgraph.analysis.analyze import analyze
    from convgraph.engine.calibrate import calibrate
    from convgraph.engine.rewrite import Selection, rewrite
    from convgraph.registry import get_rule
    from convgraph.rule import RuleContext
    from convgraph.run.runtime import run_with_outputs
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
        if found is None:  # prune always spans its consumers
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
