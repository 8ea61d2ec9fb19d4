"""The candidates' replacements, fitted once on the original model's calibration statistics (in a process
per core where that helps) and spliced into copies of the model, so that a candidate alone or a prefix of
the search is built without refitting or running the rewrite engine."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import CheckFailed, ModelError
from ..model.graph import ConvGraph
from ..model.record import ConvRecord
from ..registry import get_rule
from ..rule import RuleContext, Skip
from .int8 import Ranges, int8_replacement, quantized_plan, quantizes, ranges_for
from .report import Candidate
from .timing import apply_plan, eta


def replacement(cg: ConvGraph, by_id: Mapping[str, ConvRecord], node: str, rule_name: str,
                 given: Mapping[str, Any], stats, ranges: Ranges | None = None):
    """``rule_name``'s replacement of conv ``node`` with params ``given``, fitted on ``stats``, or for a rule
    that quantizes, in QDQ form with the calibrated activation ``ranges`` (None when the rule refuses the conv
    with these statistics, or its ranges were not calibrated)."""
    rec, rule = by_id[node], get_rule(rule_name)
    params = rule.resolve_params({k: str(v) for k, v in given.items()})
    ctx = RuleContext(cg, dict(by_id), stats, params)
    why, found = rule.check(rec, ctx)
    if why is not None:
        return None
    try:
        if quantizes(rule):
            got = ranges_for(ranges or {}, cg, rec, params)
            return None if got is None else int8_replacement(cg, rec, params, got)
        return rule.make(rec, ctx, params, found)
    except (Skip, np.linalg.LinAlgError):
        return None


def place_replacement(nodes: Sequence[onnx.NodeProto], order: Mapping[str, int], cg: ConvGraph, rep, rec: ConvRecord) -> int | None:
    """Where ``rep`` can be spliced into ``nodes`` (``order``: name → index) in place of the nodes it
    replaces: the index of the last of them; None when it does not simply stand in for them (a node it
    replaces is not there, an output of theirs read elsewhere that it does not make, a reader of its
    outputs between them)."""
    made = {o for n in rep.nodes for o in n.output}
    removed = set(rep.removed or [rec.node_id])
    at = sorted(order[n] for n in removed if n in order)
    if len(at) != len(removed):
        return None
    outs = {t for n in removed for t in cg.node(n).output if t and set(cg.consumers(t)) - removed}
    if not outs <= made or any(t in made for n in nodes[at[0]:at[-1]] if n.name not in removed for t in n.input):
        return None
    return at[-1]


def splice(original: onnx.ModelProto, reps: Sequence[tuple[int, Any]]) -> onnx.ModelProto:
    """``original`` with each replacement of ``reps`` ((index of the last node it replaces, replacement),
    :func:`place_replacement`) in place of the nodes it replaces: no reload, analysis or checks of the whole model
    (they cost more than the fits). The convs' own weights stay, unread: onnxruntime drops them."""
    m = onnx.ModelProto()
    m.CopyFrom(original)
    gone = {n for _, rep in reps for n in rep.removed}
    at = {i: rep for i, rep in reps}
    nodes = []
    for i, n in enumerate(original.graph.node):
        if i in at:
            nodes += list(at[i].nodes)
        elif n.name not in gone:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for _, rep in reps:
        m.graph.initializer.extend(rep.initializers)
    return m


def candidate_key(node: str, rule: str, params: Mapping[str, Any]) -> tuple[str, str, str]:
    return node, rule, repr(sorted(params.items()))


class Fitted:
    """The candidates' replacements fitted on the original model's calibration statistics, kept so that a
    candidate alone or a prefix of the search is built by splicing them into a copy of the model
    (:meth:`model`) instead of refitting and running the engine."""

    def __init__(self, original: onnx.ModelProto, cg: ConvGraph, by_id: Mapping[str, ConvRecord], stats,
                 input_shapes, ranges: Ranges | None = None):
        self.original, self.cg, self.by_id, self.stats, self.input_shapes = original, cg, by_id, stats, input_shapes
        self.ranges: Ranges = ranges or {}
        self.reps: dict[tuple[str, str, str], Any] = {}
        self.nodes = list(original.graph.node)
        self.order = {n.name: i for i, n in enumerate(self.nodes)}
        self.joint_failed: str | None = None  # why int8 steps could not be quantized together, if they could not

    def rep(self, c: Candidate):
        """Candidate ``c``'s replacement, fitted once (None when its rule refuses the conv)."""
        return self.rep_of(c.node, c.rule, c.params)

    def rep_of(self, node: str, rule: str, params: Mapping[str, Any]):
        k = candidate_key(node, rule, params)
        if k not in self.reps:
            self.reps[k] = replacement(self.cg, self.by_id, node, rule, params, self.stats, self.ranges)
        return self.reps[k]

    def place(self, rep, node: str) -> int | None:
        """:func:`place_replacement` in the original model."""
        return place_replacement(self.nodes, self.order, self.cg, rep, self.by_id[node])

    def model(self, plan: Mapping[str, tuple[str, dict]], joint: bool = True) -> tuple[onnx.ModelProto, dict[str, str]]:
        """The original with ``plan`` applied, each conv fitted alone on the original's statistics; and per
        conv the fit's notes. Replacements that do not simply stand in for their conv go through the engine;
        int8 steps, where there are several, are quantized together at the end (:func:`quantized_plan`:
        neighbours share scales, the ops between them go int8 too); one alone is spliced like the others."""
        reps, engine, notes, int8 = [], {}, {}, {}
        together = joint and sum(quantizes(get_rule(r)) for r, _ in plan.values()) > 1
        for node, (rule, params) in plan.items():
            rep = self.rep_of(node, rule, params)
            if rep is None:
                raise CheckFailed(f"{rule} refuses {node} with the calibration statistics")
            at = self.place(rep, node)
            if together and quantizes(get_rule(rule)):
                int8[node] = get_rule(rule).resolve_params({k: str(v) for k, v in params.items()})
                notes[node] = rep.notes
            elif at is not None:
                reps.append((at, rep))
                notes[node] = rep.notes
            else:
                engine[node] = (rule, params)
        m = splice(self.original, reps)
        if engine:
            m, changes = apply_plan(m, engine, calibration=self.stats, input_shapes=self.input_shapes)
            notes.update({ch.node: ch.notes for ch in changes})
        if int8:
            try:
                m = quantized_plan(m, self.cg, self.by_id, int8, self.ranges)
            except ModelError as e:  # each unit quantized alone instead, as the candidates were: slower, never wrong
                self.joint_failed = str(e)
                return self.model(plan, joint=False)
        return m, notes


#: Candidates fitted per task when the fits run in several processes.
FIT_CHUNK = 4
_FITTING: "Fitted | None" = None  # what forked fitting processes inherit


def _fit_chunk(cands: Sequence[Candidate]) -> list:
    assert _FITTING is not None
    return [_FITTING.rep(c) for c in cands]


def _blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS to ``n`` threads (numpy's own wheels bundle it); False where that is not
    possible (another BLAS): then the fits are not spread over processes, whose BLAS threads would
    contend (YOLOv8n: 259 s in two processes of two BLAS threads each, 58 s of one each, 78 s in one)."""
    import ctypes
    import glob

    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(n)
                return True
    return False


def _one_blas_thread() -> None:
    _blas_threads(1)


def fit_all(fitted: Fitted, todo: Sequence[Candidate], stop: Callable[[], bool], say) -> int:
    """Fit ``todo`` in order into ``fitted.reps`` until ``stop()``; returns how many were fitted. On a
    machine of several cores where processes fork (Linux) and numpy's OpenBLAS can be told its thread
    count, in a process per core of one BLAS thread each: the fits are numpy on small matrices, which BLAS
    threads speed up little (YOLOv8n's low-rank fits: 37.9 s on one thread, 31.4 s on two)."""
    import multiprocessing as mp

    global _FITTING
    t = time.perf_counter()
    workers = min(os.cpu_count() or 1, 8)
    if (workers < 2 or "fork" not in mp.get_all_start_methods() or len(todo) < 2 * FIT_CHUNK
            or not _blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", 0)) or os.cpu_count() or 1)):
        for i, c in enumerate(todo):
            if stop():
                return i
            say(f"fitting the candidates: {i + 1}/{len(todo)}{eta(t, i, len(todo))}")
            fitted.rep(c)
        return len(todo)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [list(todo[i:i + FIT_CHUNK]) for i in range(0, len(todo), FIT_CHUNK)]
    _FITTING, done = fitted, 0
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_one_blas_thread) as pool:
            futures = [pool.submit(_fit_chunk, ch) for ch in chunks]
            for ch, fut in zip(chunks, futures):
                if stop():
                    for f in futures:
                        f.cancel()
                    break
                for c, rep in zip(ch, fut.result()):
                    fitted.reps[candidate_key(c.node, c.rule, c.params)] = rep
                done += len(ch)
                say(f"fitting the candidates: {done}/{len(todo)} ({workers} processes){eta(t, done, len(todo))}")
    finally:
        _FITTING = None
    return done
