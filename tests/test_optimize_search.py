"""Properties of the optimizer's pure search: the per-conv convex hull, the greedy order, the prefix search."""

from __future__ import annotations

import math

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from convgraph.optimize import STABLE_SHARE, Candidate, Step, greedy_sequence, plan_of, search

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def candidates(draw) -> list[Candidate]:
    out = []
    for n in range(draw(st.integers(1, 4))):
        before = draw(st.floats(1.0, 10.0))
        for k in range(draw(st.integers(1, 5))):
            after = draw(st.floats(0.1, 12.0))
            error = draw(st.one_of(st.none(), st.just(math.nan), st.floats(0.0, 0.05)))
            share = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
            out.append(Candidate(f"conv{n}", "r", {"k": k}, "x", 100, 50, before, after, error, None, share))
    return out


def _eligible(c: Candidate) -> bool:
    return (c.error is not None and math.isfinite(c.error) and c.saving_ms > 0
            and (c.faster_share is None or c.faster_share >= STABLE_SHARE))


@SETTINGS
@given(candidates(), st.floats(10.0, 100.0))
def test_greedy_sequence_is_a_convex_hull_per_conv_in_order_of_efficiency(cands, baseline):
    steps = greedy_sequence(cands, baseline)
    ok = [c for c in cands if _eligible(c)]
    # only eligible candidates, and every conv that has one ends at its largest saving (the least error among those)
    by_key = {(c.node, c.params["k"]): c for c in ok}
    assert all((s.node, s.params["k"]) in by_key for s in steps)
    for node in {c.node for c in ok}:
        mine = [c for c in ok if c.node == node]
        best = max(c.saving_ms for c in mine)
        last = by_key[(node, plan_of(steps)[node][1]["k"])]
        assert last.saving_ms == best and last.error == min(c.error for c in mine if c.saving_ms == best)
        own = [s for s in steps if s.node == node]
        assert math.isclose(sum(s.saving_ms for s in own), best, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(sum(s.error for s in own), last.error, rel_tol=1e-9, abs_tol=1e-12)
        # the chosen points are not dominated: no option saves as much or more with less error
        for s in own:
            c = by_key[(node, s.params["k"])]
            assert not any(o.error < c.error and o.saving_ms >= c.saving_ms for o in mine)
    assert not {c.node for c in cands} - {c.node for c in ok} & {s.node for s in steps}
    # running totals, and saving per unit of error never rises along the sequence
    ms, err = baseline, 0.0
    for s in steps:
        ms, err = ms - s.saving_ms, err + s.error
        assert math.isclose(s.predicted_ms, ms) and math.isclose(s.predicted_error, err, abs_tol=1e-15)
        assert s.saving_ms > 0 and s.error >= 0
    eff = [s.saving_ms / max(s.error, 1e-7) for s in steps]
    assert all(a >= b * (1 - 1e-9) for a, b in zip(eff, eff[1:]))


@st.composite
def poisoned(draw) -> tuple[list[Step], set[int]]:
    n = draw(st.integers(0, 12))
    nodes = [draw(st.integers(0, 4)) for _ in range(n)]
    steps = [Step(f"conv{c}", "r", {"i": i}, 1.0, 0.01, 0.0, 0.0) for i, c in enumerate(nodes)]
    return steps, set(draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=3))) if n else set()


@SETTINGS
@given(poisoned())
def test_search_backs_off_exactly_the_steps_that_break_the_model(case):
    """A prefix passes iff it holds no poisoned step: with evaluations enough, search drops each poisoned
    step and the later steps of its conv, nothing else, and only ever evaluates prefixes of what is left."""
    steps, poison = case
    calls = []

    def evaluate(prefix):
        calls.append([s.params["i"] for s in prefix])
        return not any(s.params["i"] in poison for s in prefix), 0.0

    dropped = search(steps, evaluate, allowance=None, max_evals=10 * len(steps) + 10)
    first = {}
    for i, s in enumerate(steps):
        if i in poison:
            first.setdefault(s.node, i)
    expected = [s.params["i"] for i, s in enumerate(steps) if s.node in first and i >= first[s.node]]
    assert sorted(s.params["i"] for s in dropped) == expected
    for c in calls:  # a prefix of the sequence less steps it backed off
        assert c and c == sorted(c) and set(range(c[-1] + 1)) - set(c) <= set(expected)


@SETTINGS
@given(poisoned(), st.integers(0, 6))
def test_search_keeps_to_its_evaluation_budget(case, budget):
    steps, poison = case
    calls = []

    def evaluate(prefix):
        calls.append(prefix)
        return not any(s.params["i"] in poison for s in prefix), 0.0

    search(steps, evaluate, allowance=0.05, max_evals=budget)
    assert len(calls) <= budget
    assert all(c and all(isinstance(s, Step) for s in c) for c in calls)


def test_a_step_whose_nodes_another_convs_step_touches_is_left_out():
    """Prune of a refits its consumer b: once chosen, b's own options are out, and a's prune is out once a
    step of b came first; a conv that loses an option goes on along the hull of what is left."""
    def c(node, rule, saving, error, touches=()):
        return Candidate(node, rule, {}, "x", 100, 50, 10.0, 10.0 - saving, error, touches=list(touches))

    prune_a = c("a", "prune", 2.0, 0.001, ("a", "relu", "b"))  # 2000/unit: first
    steps = greedy_sequence([prune_a, c("b", "low-rank", 1.0, 0.002), c("a", "low-rank", 0.5, 0.01)], 20.0)
    assert [(s.node, s.rule) for s in steps] == [("a", "prune")]  # b is prune's; a's low-rank saves less
    # b's low-rank first (1000/unit): a's prune is out, a goes on with its low-rank, which prune had hidden
    steps = greedy_sequence([c("a", "prune", 2.0, 0.004, ("a", "relu", "b")), c("b", "low-rank", 1.0, 0.001),
                             c("a", "low-rank", 0.5, 0.003)], 20.0)
    assert [(s.node, s.rule, s.saving_ms, s.error) for s in steps] == [
        ("b", "low-rank", 1.0, 0.001), ("a", "low-rank", 0.5, 0.003)]
    assert steps[-1].predicted_ms == 18.5 and steps[-1].predicted_error == pytest.approx(0.004)


@st.composite
def overlapping(draw) -> list[Candidate]:
    out = []
    for n in range(draw(st.integers(1, 5))):
        for k in range(draw(st.integers(1, 4))):
            touches = draw(st.one_of(st.just([]), st.lists(st.sampled_from([f"conv{i}" for i in range(5)]), max_size=3)))
            out.append(Candidate(f"conv{n}", "r", {"k": k}, "x", 100, 50, 10.0, draw(st.floats(0.1, 9.9)),
                                 draw(st.floats(0.0, 0.05)), touches=[f"conv{n}", *touches] if touches else []))
    return out


@SETTINGS
@given(overlapping())
def test_no_prefix_plans_two_rewrites_that_touch_one_node(cands) -> None:
    """After every step, the candidates planned for different convs touch disjoint nodes; each conv's
    steps add up to the candidate it is planned at."""
    steps = greedy_sequence(cands, 100.0)
    by_key = {(c.node, c.params["k"]): c for c in cands}
    for i in range(1, len(steps) + 1):
        chosen = [by_key[(n, p["k"])] for n, (_, p) in plan_of(steps[:i]).items()]
        seen: dict[str, str] = {}
        for c in chosen:
            for t in c.touches or [c.node]:
                assert seen.setdefault(t, c.node) == c.node
    for node, (_, p) in plan_of(steps).items():
        own = [s for s in steps if s.node == node]
        assert math.isclose(sum(s.saving_ms for s in own), by_key[(node, p["k"])].saving_ms, rel_tol=1e-9)
        assert all(s.saving_ms > 0 and s.error >= 0 for s in own)


def test_near_the_budget_steps_predicted_past_it_are_left_out_unbuilt():
    """Errors that add up: ten steps of 0.01 each, allowance 0.05. Once the fifth step's prefix passes at 0.05
    and the sixth fails, every later step would take the passing prefix past the allowance alone: they are
    backed off without being built (YOLOv8n with int8 spent seven builds in a row on such failures)."""
    steps = [Step(f"conv{i}", "r", {"i": i}, 1.0, 0.01, 0.0, 0.0) for i in range(10)]
    calls = []

    def evaluate(prefix):
        calls.append(len(prefix))
        err = 0.01 * len(prefix)
        return err <= 0.05 + 1e-12, err

    unbuilt: list[Step] = []
    dropped = search(steps, evaluate, allowance=0.05, max_evals=20, unbuilt=unbuilt)
    assert [s.params["i"] for s in dropped] == list(range(5, 10))
    assert [s.params["i"] for s in unbuilt] == list(range(6, 10))  # step 5 was built and failed
    assert len(calls) <= 4 and calls[-1] == 6  # nothing built after the back-off
