"""The pure search: per-conv chains of steps (the lower convex hull), their greedy order, and the prefix search."""

from __future__ import annotations

import heapq
import math
from typing import Sequence

from .report import ERROR_FLOOR, PREDICTION_SLACK, STABLE_SHARE, Candidate, Point, Step


# ---- the greedy sequence ------------------------------------------------------------------------------------
def _e(c: Candidate) -> float:
    """A candidate's model-level error (the sequence holds only candidates that have one)."""
    return math.inf if c.error is None else c.error


def _hull(opts: Sequence[Candidate], e0: float, s0: float) -> list[Candidate]:
    """The options on the lower-right convex hull of (error, saving) from the point (``e0``, ``s0``), in order."""
    hull: list[Candidate] = []
    for c in sorted(opts, key=lambda c: (_e(c), -c.saving_ms)):
        if c.saving_ms <= (hull[-1].saving_ms if hull else s0):
            continue
        while hull:
            prev_e, prev_s = (_e(hull[-2]), hull[-2].saving_ms) if len(hull) > 1 else (e0, s0)
            e1, s1 = _e(hull[-1]) - prev_e, hull[-1].saving_ms - prev_s
            e2, s2 = _e(c) - prev_e, c.saving_ms - prev_s
            if s1 * max(e2, ERROR_FLOOR) <= s2 * max(e1, ERROR_FLOOR):  # c is at least as efficient
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def greedy_sequence(cands: Sequence[Candidate], baseline_ms: float) -> list[Step]:
    """Steps in order of saving per unit of error; per conv its options' lower convex hull, in order.

    A candidate that rewrites more than its conv (``Candidate.touches``: prune refits the consumer convs)
    excludes the candidates of other convs touching any of those nodes: once a step of one conv claims a
    node, the other convs' options that touch it are out, and a conv that loses options continues along
    the hull of those left (so every prefix is a plan whose rewrites do not overlap)."""
    by_node: dict[str, list[Candidate]] = {}
    for c in cands:
        if c.error is not None and c.saving_ms > 0 and math.isfinite(c.error) and (
                c.faster_share is None or c.faster_share >= STABLE_SHARE):
            by_node.setdefault(c.node, []).append(c)
    claims: dict[str, str] = {}  # node id -> the conv whose chosen steps touch it
    at: dict[str, tuple[float, float]] = {}  # conv -> (error, saving) of its last step
    heap: list = []

    def free(c: Candidate) -> bool:
        return all(claims.get(t, c.node) == c.node for t in c.touches or (c.node,))

    def offer(node: str) -> None:  # the conv's next step: the first of its hull over the options still free
        e0, s0 = at.get(node, (0.0, 0.0))
        hull = _hull([c for c in by_node[node] if free(c)], e0, s0)
        if hull:
            c = hull[0]
            de, ds = max(_e(c) - e0, 0.0), c.saving_ms - s0
            heapq.heappush(heap, (-ds / max(de, ERROR_FLOOR), node, c, ds, de))  # one entry per conv at most

    for node in by_node:
        offer(node)
    steps, ms, err = [], baseline_ms, 0.0
    while heap:  # in order of efficiency; a conv's later steps never before its earlier ones (less efficient)
        _, node, c, ds, de = heapq.heappop(heap)
        if free(c):
            claims.update(dict.fromkeys(c.touches or (c.node,), node))
            at[node] = (c.error, c.saving_ms)
            ms -= ds
            err += de
            steps.append(Step(node, c.rule, dict(c.params), ds, de, ms, err))
        offer(node)  # its next step, or (claimed since offered) the best among the options left
    return steps


def plan_of(steps: Sequence[Step]) -> dict[str, tuple[str, dict]]:
    """node → (rule, params) after these steps (a conv's last step wins)."""
    plan: dict[str, tuple[str, dict]] = {}
    for s in steps:
        plan[s.node] = (s.rule, s.params)
    return plan


def search(steps: Sequence[Step], evaluate, *, allowance: float | None, max_evals: int, stop=None,
           unbuilt: list[Step] | None = None) -> list[Step]:
    """Find the longest passing prefix of ``steps`` with at most ``max_evals`` calls of ``evaluate(prefix)
    -> (passed, error)``, backing off the steps that break it.

    Bisection between the longest prefix known to pass and the shortest known to fail, the first guess
    from the predicted errors (scaled by how far the measured error of the last passing prefix exceeded
    its prediction). When the two are adjacent, the step between them alone turns a passing model into a
    failing one: it is backed off — dropped, with the later (more aggressive) steps of the same conv —
    and the search goes on over the rest; ``stop()`` true ends it (a time budget). Returns the steps backed off;
    ``unbuilt`` gets those of them backed off without being built (predicted past the allowance).
    """
    seq, dropped = list(steps), []
    lo, hi, evals, scale, err_lo = 0, len(seq) + 1, 0, 1.0, 0.0

    def guess() -> int:
        if allowance is None:
            return lo + max(1, (len(seq) - lo) // 2)
        total, k = 0.0, lo + 1
        for i, st in enumerate(seq):
            total += st.error
            if i >= lo and total * scale <= allowance:
                k = i + 1
        return k

    k = min(guess(), len(seq))
    while seq and evals < max_evals and not (stop is not None and stop()):
        if hi - lo == 1:
            if hi > len(seq):
                break  # the whole (remaining) sequence passes
            bad = seq[hi - 1]
            dropped += [st for st in seq[hi - 1:] if st.node == bad.node]
            seq = seq[:hi - 1] + [st for st in seq[hi:] if st.node != bad.node]
            # the steps that even alone would take the passing prefix past the allowance (their predicted error,
            # scaled as measured so far) are backed off unbuilt: near the budget errors add up, and trying them
            # one by one spends every evaluation on failures (YOLOv8n with int8: seven in a row)
            while allowance is not None and lo < len(seq) and err_lo + seq[lo].error * scale > allowance:
                gone = seq[lo]
                dropped += [st for st in seq[lo:] if st.node == gone.node]
                if unbuilt is not None:
                    unbuilt += [st for st in seq[lo:] if st.node == gone.node]
                seq = seq[:lo] + [st for st in seq[lo + 1:] if st.node != gone.node]
            hi = len(seq) + 1
            if lo >= len(seq):
                break
            k = min(guess(), len(seq))
            continue
        passed, err = evaluate(seq[:k])
        evals += 1
        if passed:
            lo, err_lo = k, err
            predicted = sum(st.error for st in seq[:k])
            scale = max(scale, err / predicted) if predicted > 0 else scale
            grow = min(len(seq), lo + max(1, (lo + 1) // 2))
            # growing past the prediction is for a search that has seen no failure: after a back-off the steps
            # left are the ones the prediction says may fit, and what failed before mostly fails again
            k = (guess() if dropped else max(guess(), grow)) if hi > len(seq) else (lo + hi) // 2
        else:
            hi = k
            k = (lo + hi) // 2
        k = min(max(k, lo + 1), hi - 1) if hi - lo > 1 else k
    return dropped


def to_largest_step(prefix: Sequence[Step]) -> int:
    """The length of ``prefix`` up to and including its largest step (the most time saved alone; 0 when empty):
    the steps after it save less each, and in the model they may save nothing at all."""
    return 1 + max(range(len(prefix)), key=lambda i: prefix[i].saving_ms) if prefix else 0


def needs_shorter(p: Point) -> bool:
    """Whether a built prefix calls for trying a shorter one: no faster than the original, or slower than
    its layers' measured savings predict by more than PREDICTION_SLACK (latency not additive)."""
    return p.speedup <= 1.0 or p.measured_ms > PREDICTION_SLACK * p.predicted_ms
