"""Sequential fitting: a plan built conv by conv, each fitted on the activations of the model rewritten so far."""

from __future__ import annotations

from typing import Mapping

import networkx as nx
import onnx

from ..analysis.analyze import analyze
from ..fit.calibration import Calibration
from ..engine.calibrate import calibrate
from ..model.graph import ConvGraph
from ..model.loader import load
from .timing import apply_plan, stats_needed


# ---- sequential fitting ---------------------------------------------------------------------------------------
def fit_sequential(original: onnx.ModelProto, plan: Mapping[str, tuple[str, dict]], calib, *,
                   input_shapes=None, provider: str = "cpu", threads: int | None = None,
                   progress=None, cache: dict | None = None) -> tuple[onnx.ModelProto, list]:
    """Apply ``plan`` (node → (rule, params)) in stages, in topological order: each conv's statistics are
    gathered on the model rewritten so far, with the original as the reference, so its fit targets the
    original layer's output from the activations it will really get. Convs none of which lies upstream of
    another share a stage (one calibration pass). ``cache`` (a dict kept between calls with the same
    ``original`` and ``calib``) keeps the model after each run of stages: a plan whose first stages are
    those of an earlier plan (same convs, rules and params in each) starts after them. Returns the model
    and the engine's changes."""
    cg = load(original, input_shapes, check=False)
    order = {n: i for i, n in enumerate(cg.topological_order())}
    nodes = sorted(plan, key=lambda n: order[n])
    depth = _stages(cg, set(nodes))
    recs = {r.node_id: r for r in analyze(cg, rewrites=False).convs}
    stages = [[n for n in nodes if depth[n] == k] for k in range(max(depth.values(), default=-1) + 1)]
    keys = [tuple((n, plan[n][0], repr(sorted(plan[n][1].items()))) for n in members) for members in stages]
    model, changes, start = original, [], 0
    for j in range(len(stages), 0, -1):
        hit = cache.get(tuple(keys[:j])) if cache is not None else None
        if hit is not None:
            model, changes, start = hit[0], list(hit[1]), j
            break
    for stage in range(start, len(stages)):
        members = stages[stage]
        calibrated = list(dict.fromkeys(n for m in members for n in stats_needed(cg, recs, m, *plan[m])))
        stats = Calibration()
        if calibrated:
            stats = calibrate(model, calib, nodes=calibrated, reference=original, input_shapes=input_shapes,
                              provider=provider, threads=threads)
        model, ch = apply_plan(model, {n: plan[n] for n in members}, calibration=stats, input_shapes=input_shapes)
        changes += ch
        if cache is not None:
            _keep(cache, tuple(keys[:stage + 1]), (model, list(changes), model.ByteSize()))
        if progress is not None:
            progress(stage)
    return model, changes


#: Models kept by fit_sequential's cache, in bytes (the oldest go first).
FIT_CACHE_BYTES = 384 << 20


def _keep(cache: dict, key, entry) -> None:
    cache[key] = entry
    total = sum(e[2] for e in cache.values())
    while total > FIT_CACHE_BYTES and len(cache) > 1:
        oldest = next(iter(cache))
        total -= cache.pop(oldest)[2]


def _stages(cg: ConvGraph, chosen: set[str]) -> dict[str, int]:
    """Per chosen node, how many chosen nodes lie upstream of it on the longest path: one topological
    pass (linear in the graph), so that convs with no chosen conv between them share a stage."""
    G = cg.graph
    above: dict[str, int] = {}  # stages completed by the chosen nodes upstream of a node, inclusive
    depth: dict[str, int] = {}
    for v in nx.topological_sort(G):
        level = max((above[u] for u in G.predecessors(v)), default=0)
        if v in chosen:
            depth[v] = level
            level += 1
        above[v] = level
    return depth
