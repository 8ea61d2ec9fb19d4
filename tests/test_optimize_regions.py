"""The search prices int8 units in context (optimize.regions): the boundaries a unit removes beside int8
neighbours, across the data-movement ops wholly between them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.optimize import Candidate, greedy_sequence
from convgraph.optimize.regions import Regions

PAIRS = {"x": 1.0, "a": 1.0, "s1": 0.5, "b": 0.5, "c": 1.0, "y": 1.0}


def c2f_like():
    """x → A → a → Split → (s0, s1); s1 → B → b; Concat(s0, b) → c → C → y: YOLOv8's C2f block in small."""
    w = [numpy_helper.from_array(np.ones((k, k, 1, 1), np.float32), f"w{k}") for k in (4, 2)]
    nodes = [helper.make_node("Conv", ["x", "w4"], ["a"], name="A"),
             helper.make_node("Split", ["a"], ["s0", "s1"], name="split", axis=1, num_outputs=2),
             helper.make_node("Conv", ["s1", "w2"], ["b"], name="B"),
             helper.make_node("Concat", ["s0", "b"], ["c"], name="concat", axis=1),
             helper.make_node("Conv", ["c", "w4"], ["y"], name="C")]
    io = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 4, 8, 8]) for t in ("x", "y")]
    return helper.make_graph(nodes, "c2f", io[:1], io[1:], w)


@pytest.fixture
def regions():
    sizes = {t: 256 if t in ("x", "a", "c", "y") else 128 for t in ("x", "a", "s0", "s1", "b", "c", "y")}
    return Regions(c2f_like(), {"A": ["A"], "B": ["B"], "C": ["C"]}, PAIRS, sizes)


def test_a_lone_unit_saves_what_it_saves_alone(regions):
    for conv, edges in (("A", ("x", "a")), ("B", ("s1", "b")), ("C", ("c", "y"))):
        assert regions.bonus(conv, set(), edges) == pytest.approx(0.0)


def test_a_unit_between_int8_neighbours_saves_their_boundaries_and_its_own(regions):
    # A int8 alone: the Split stays float (its other output feeds the Concat, which feeds a float conv), so B
    # between float ops pays its own Q and DQ as alone
    assert regions.bonus("B", {"A"}, ("s1", "b")) == pytest.approx(0.0)
    # with A and C int8, B closes the Split and the Concat: no Q, no DQ anywhere in the block — B saves its own
    # pair halves (0.25 + 0.25), A's DQ on a (0.5) and C's Q on c (0.5)
    assert regions.bonus("B", {"A", "C"}, ("s1", "b")) == pytest.approx(1.5)
    # C beside an int8 B alone: the Concat still reads the float Split's s0, so nothing closes
    assert regions.bonus("C", {"B"}, ("c", "y")) == pytest.approx(0.0)


def test_unmeasured_boundaries_are_priced_by_size(regions):
    # s0 (between Split and Concat) was not timed: the measured pairs' median cost per element, times its size
    assert regions.pair["s0"] == pytest.approx(np.median([v / (256 if t in "xacy" else 128)
                                                          for t, v in PAIRS.items()]) * 128)


def test_neighbours_are_the_units_whose_price_a_unit_changes(regions):
    assert regions.neighbours("B") == {"A", "C"}
    assert regions.neighbours("A") == {"B", "C"}


def test_the_search_takes_a_unit_that_saves_nothing_alone_once_its_neighbours_are_int8(regions):
    def unit(node, after, edges):
        return Candidate(node, "int8", {}, "x (int8)", 10, 10, 1.0, after, error=1e-3,
                         boundary_ms={t: PAIRS[t] for t in edges})

    cands = [unit("A", 0.5, ("x", "a")), unit("B", 1.2, ("s1", "b")), unit("C", 0.5, ("c", "y"))]
    assert [s.node for s in greedy_sequence(cands, 10.0)] == ["A", "C"]  # B alone is slower than float
    steps = greedy_sequence(cands, 10.0, regions)
    assert [s.node for s in steps] == ["A", "C", "B"]
    assert steps[-1].saving_ms == pytest.approx(-0.2 + 1.5)  # priced between A and C
    assert steps[-1].predicted_ms == pytest.approx(10.0 - 0.5 - 0.5 - 1.3)


def test_pricing_a_long_chain_of_units_is_linear():
    """10,000 units, an Identity between each two: building the regions and the whole greedy sequence looks at
    each unit's neighbourhood only (a quadratic search would take minutes)."""
    import time

    n = 10_000
    nodes, pairs, sizes = [], {}, {}
    for i in range(n):
        nodes += [helper.make_node("Relu", [f"t{i}"], [f"u{i}_out"], name=f"u{i}"),
                  helper.make_node("Identity", [f"u{i}_out"], [f"t{i + 1}"], name=f"i{i}")]
        pairs.update({f"t{i}": 0.01, f"u{i}_out": 0.01})
    sizes = {t: 4 for t in pairs} | {f"t{n}": 4}
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [4])])
    t = time.process_time()
    regions = Regions(g, {f"u{i}": [f"u{i}"] for i in range(n)}, pairs, sizes)
    cands = [Candidate(f"u{i}", "int8", {}, "x", 1, 1, 1.0, 0.995 if i % 2 == 0 else 1.005, error=1e-4,
                       boundary_ms={f"t{i}": 0.01, f"u{i}_out": 0.01}) for i in range(n)]
    steps = greedy_sequence(cands, 1000.0, regions)
    assert time.process_time() - t < 20
    # the even units save alone; the odd ones lose alone, save between int8 neighbours: all go int8
    assert len(steps) == n
    # in int8 the units run 0.015 / 0.005 ms faster than float (without their pairs); the run pays one Q at its
    # start and one DQ at its end (the graph output)
    assert steps[-1].predicted_ms == pytest.approx(1000.0 - (n // 2) * (0.015 + 0.005) + 0.005 + 0.005)
