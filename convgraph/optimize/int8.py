"""int8 candidates: a conv's int8 unit in QDQ form (onnxruntime's quantizer, :mod:`convgraph.engine.quantize`), with
activation ranges calibrated once for every int8 candidate.

A candidate of a rule that quantizes (``Rule.quantizes``: ``int8``) is the conv and the activation after it
(``rules/int8.py``: SiLU, LeakyRelu, Relu, Clip) in QDQ form: its input quantized and dequantized, its weights
per channel, its output quantized and dequantized. Timed as a one-layer model it pays for its own
QuantizeLinear/DequantizeLinear pair at each boundary, as a lone int8 unit between float neighbours does. A plan
with several int8 steps is quantized in one pass (:func:`quantized_plan`): neighbours share the quantization of
the tensor between them and the ops wholly between units go int8 too, which the search sees when it times
whole prefixes in the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..model.graph import ConvGraph
from ..model.record import ConvRecord
from ..rule import Replacement, Rule

#: Ranges for timing a candidate before any calibration: a layer's time does not depend on its scales.
TIMING_RANGE = (-4.0, 4.0)

Ranges = Mapping[str, Mapping[str, tuple[float, float]]]  # calibration method → tensor → (low, high)


def quantizes(rule: Rule) -> bool:
    """Whether ``rule``'s replacements are quantized by the engine (``int8``)."""
    return bool(getattr(rule, "quantizes", False))


def _region(cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any]):
    """The int8 unit of conv ``rec`` (its node ids: the conv and, unless ``params`` leave it float, the
    activation after it, as the rule matches) and how its activations are quantized."""
    from ..engine.quantize import plan
    from ..rule import RuleContext
    from ..rules.int8 import activation_after

    after = activation_after(rec, RuleContext(cg)) if params.get("activation", "int8") == "int8" else []
    ids = [rec.node_id, *after]
    nodes = [cg.node(n) for n in ids]
    return ids, nodes, plan(cg, nodes, [nodes[-1].output[0]], quantize_io=True)


def unit_nodes(cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any]) -> list[str]:
    """The node ids an int8 step of conv ``rec`` quantizes: the conv and the activation after it."""
    return _region(cg, rec, params)[0]


def join_tensors(cg: ConvGraph) -> list[str]:
    """The float activations of the main graph's ops that can join int8 units (``engine.quantize.JOINS``): their
    ranges are calibrated with the units', for the joins a plan's int8 units enclose."""
    from ..engine.quantize import JOINS
    from ..model.weights import constant_value

    out: dict[str, None] = {}
    for nid in cg.ops(JOINS):
        n = cg.node(nid)
        for t in [*n.input, *n.output]:
            info = cg.shapes.get(t) if t else None
            if info is not None and info.elem_type == onnx.TensorProto.FLOAT and t not in out \
                    and constant_value(cg, t) is None:
                out[t] = None
    return list(out)


def tensors_to_calibrate(cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any]) -> list[str]:
    """The activations an int8 replacement of ``rec`` needs ranges for (its input and output, unless the
    graph quantizes them already)."""
    return list(_region(cg, rec, params)[2].calibrate)


def int8_replacement(cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any],
                     ranges: Mapping[str, tuple[float, float]] | None) -> Replacement:
    """Conv ``rec`` in QDQ form; ``ranges`` None: placeholder ranges (for timing only)."""
    from ..engine.quantize import UNITS, quantize_region, reduce_range, weight_error
    from ..model.weights import constant_value

    ids, nodes, p = _region(cg, rec, params)
    rng = dict(ranges) if ranges is not None else {t: TIMING_RANGE for t in p.calibrate}
    method, reduce = str(params["calibration"]), reduce_range(str(params["reduce_range"]))
    new, inits = quantize_region(cg, nodes, p, rng, method=method, reduce=reduce, base=rec.node_id, ops=UNITS)
    w = constant_value(cg, rec.weight)
    err = weight_error([w], new, inits) if w is not None else None
    acts = "+".join(n.op_type for n in nodes[1:])
    return Replacement(new, inits, False, f"{rec.kind} (int8)", rec.macs, rec.params, weight_error=err, removed=ids,
                       notes=f"int8, {method} ranges{', 7-bit weights' if reduce else ''}; QDQ: per-channel int8 "
                             f"weights, uint8 activations" + (f"; its {acts} in int8 too" if acts else ""))


def calibrate(original, cg: ConvGraph, wanted: Iterable[tuple[ConvRecord, Mapping[str, Any]]],
              feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per calibration method, the ranges of every activation the int8 candidates ``wanted`` ((record,
    params) pairs) need, and those of the ops that can join them (:func:`join_tensors`), in one run over
    ``feeds`` per method."""
    from ..engine.quantize import calibrate_ranges

    need: dict[str, set[str]] = {}
    joins = join_tensors(cg) if wanted else []
    for rec, params in wanted:
        need.setdefault(str(params["calibration"]), set()).update(tensors_to_calibrate(cg, rec, params), joins)
    return {method: calibrate_ranges(original, sorted(ts), list(feeds), method, types=cg.shapes)
            for method, ts in need.items() if ts}


def quantized_plan(model: onnx.ModelProto, cg: ConvGraph, by_id: Mapping[str, ConvRecord],
                   steps: Mapping[str, Mapping[str, Any]], ranges: Ranges) -> onnx.ModelProto:
    """``model`` (the original with a plan's other rewrites spliced in) with the int8 steps ``steps`` (conv id →
    params) quantized together: their units and the joins between them in one pass of onnxruntime's quantizer
    (``engine.quantize.quantize_model``), so that neighbours share their quantization and the ops between
    them run on int8 too. One calibration method and reduce_range for all (the optimizer offers one)."""
    from ..engine.quantize import quantize_model, reduce_range
    from ..errors import CheckFailed

    how = {(str(p["calibration"]), str(p["reduce_range"])) for p in steps.values()}
    if len(how) != 1:
        raise CheckFailed(f"int8 steps with different calibration settings in one plan: {sorted(how)}")
    method, reduce = how.pop()
    units = [n for node, p in steps.items() for n in unit_nodes(cg, by_id[node], p)]
    return quantize_model(model, units, ranges.get(method, {}), method=method, reduce=reduce_range(reduce))


def ranges_for(ranges: Ranges, cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any]
               ) -> dict[str, tuple[float, float]] | None:
    """The calibrated ranges an int8 replacement of ``rec`` needs (None when any is missing)."""
    got = ranges.get(str(params["calibration"]), {})
    need = tensors_to_calibrate(cg, rec, params)
    return {t: got[t] for t in need} if all(t in got for t in need) else None
