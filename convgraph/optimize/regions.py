"""What an int8 unit saves in context: a boundary between int8 and float costs a QuantizeLinear or a
DequantizeLinear; between int8 neighbours (and across the data-movement ops wholly between them) there is none.

A lone int8 unit is timed as a one-layer model with a Q→DQ pair at its input and output, so its one-layer saving
pays both. In a plan, the model of latency is: every layer's own time (float, or its int8 unit without those
pairs), plus, for each activation whose producer and some reader differ (one int8, one float), half the Q→DQ
pair timed on it (one Q or one DQ). :meth:`Regions.bonus` is what adding a unit to a plan saves beyond its
one-layer saving under that model: the boundaries it removes (neighbours already int8, joins it closes) less the
ones it adds. Measured boundaries: ``benchmarks/bench_int8.py --boundaries``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..engine.quantize import Joins
from ..model.graph import ConvGraph
from ..model.record import ConvRecord
from .report import Candidate


def qdq_pair(tensor: str, shape: Sequence[int]) -> onnx.ModelProto:
    """A QuantizeLinear → DequantizeLinear pair (uint8) on a float tensor of ``shape``: what a boundary between
    int8 and float costs there (the scale does not change the time)."""
    x = helper.make_tensor_value_info(tensor, TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info(tensor + "_qdq", TensorProto.FLOAT, list(shape))
    g = helper.make_graph([helper.make_node("QuantizeLinear", [tensor, "s", "z"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], [y.name])], "qdq", [x], [y],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
                           helper.make_tensor("z", TensorProto.UINT8, [], [128])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


#: Joins touching each other in a cluster larger than this (a long run of data movement) are not priced: taken
#: to stay float, so that pricing a unit looks at a bounded neighbourhood.
MAX_CLUSTER = 256


class Regions:
    """The int8 units of a graph (conv id → the node names of its unit) with the Q→DQ pair measured on the
    activations at their edges (``pair_ms``: tensor → ms); a boundary on another activation (between two joins)
    is priced by its size at the measured pairs' median cost per element (``sizes``: tensor → elements)."""

    def __init__(self, graph: onnx.GraphProto, units: Mapping[str, Sequence[str]], pair_ms: Mapping[str, float],
                 sizes: Mapping[str, int]):
        self.joins = Joins(graph)
        self.units = {c: list(ns) for c, ns in units.items()}
        self.unit_of = {n: c for c, ns in self.units.items() for n in ns}
        per = [ms / sizes[t] for t, ms in pair_ms.items() if sizes.get(t)]
        rate = float(np.median(per)) if per else 0.0
        self.pair = {t: pair_ms.get(t, rate * n) for t, n in sizes.items()}
        self.pair.update(pair_ms)
        # joins that touch each other form a cluster: whether one is enclosed depends on the rest of its cluster
        self.cluster: dict[str, int] = {}
        members: list[list[str]] = []
        for j in sorted(self.joins.names):
            if j in self.cluster:
                continue
            stack, members_ = [j], []
            self.cluster[j] = len(members)
            while stack:
                n = stack.pop()
                members_.append(n)
                for m in self._around(n):
                    if m in self.joins.names and m not in self.cluster:
                        self.cluster[m] = len(members)
                        stack.append(m)
            members.append(members_)
        self.members = members
        # per unit: its nodes and the joins of the clusters beside it (its status changes their enclosure)
        self.zone = {c: ns + [j for k in sorted({self.cluster[m] for n in ns for m in self._around(n)
                                                 if m in self.cluster}) if len(members[k]) <= MAX_CLUSTER
                              for j in members[k]]
                     for c, ns in self.units.items()}
        reach: dict[str, set[str]] = {}  # node → the units whose bonus reads its status
        for c, zone in self.zone.items():
            for n in zone:
                for m in [n, *self._around(n)]:
                    reach.setdefault(m, set()).add(c)
        self._reach = reach

    def _around(self, name: str) -> list[str]:
        """The nodes that make what ``name`` reads or read what it makes (activations only)."""
        j = self.joins
        n = j.by_name[name]
        return [*(j.producer[t] for t in n.input if t and t in j.producer and t not in j.consts),
                *(r for o in n.output if o for r in j.readers.get(o, ()))]

    def neighbours(self, conv: str) -> set[str]:
        """The units whose :meth:`bonus` may change when ``conv``'s unit goes int8."""
        return {d for n in self.zone[conv] for d in self._reach.get(n, ())} - {conv}

    def _edges(self, conv: str, int8: Collection[str]) -> float:
        """The boundaries' cost around ``conv``'s zone with the units ``int8`` in int8."""
        j = self.joins

        def unit(name: str) -> bool:
            return self.unit_of.get(name) in int8

        zone = self.zone[conv]
        closed = j.enclosed(unit, [n for n in zone if n in j.names])
        tensors = {t for n in zone for t in [*j.by_name[n].input, *j.by_name[n].output]
                   if t and t not in j.consts}
        cost = 0.0
        for t in tensors:
            made = j.producer.get(t)
            side = made is not None and (unit(made) or made in closed)
            read = [r for r in j.readers.get(t, ())]
            if any((unit(r) or r in closed) != side for r in read) or (side and t in j.outputs):
                cost += self.pair.get(t, 0.0) / 2
        return cost

    def bonus(self, conv: str, int8: Collection[str], edges: Iterable[str]) -> float:
        """What ``conv``'s unit saves, added to the units ``int8``, beyond its one-layer saving (which paid a Q on
        its input and a DQ on its output: ``edges``, the tensors its one-layer model was timed between)."""
        paid = sum(self.pair.get(t, 0.0) for t in edges) / 2
        return paid + self._edges(conv, int8) - self._edges(conv, {*int8, conv})


def regions_of(cg: ConvGraph, by_id: Mapping[str, ConvRecord], cands: Iterable[Candidate]) -> Regions | None:
    """The :class:`Regions` of the int8 candidates among ``cands`` (their units as the int8 rule matches them,
    the pairs timed beside them), or None when there are none."""
    from ..registry import get_rule
    from .int8 import unit_nodes

    units: dict[str, list[str]] = {}
    pair_ms: dict[str, float] = {}
    for c in cands:
        if c.boundary_ms and c.node in by_id and c.node not in units:
            units[c.node] = unit_nodes(cg, by_id[c.node], get_rule(c.rule).resolve_params(
                {k: str(v) for k, v in c.params.items()}))
            pair_ms.update(c.boundary_ms)
    if not units:
        return None
    sizes = {t: int(np.prod(i.shape or ())) for t, i in cg.shapes.items() if i.static}
    return Regions(cg.to_model().graph, units, pair_ms, sizes)
