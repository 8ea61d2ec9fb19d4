"""int8 candidates: a conv's replacement in QDQ form (onnxruntime's quantizer, :mod:`convgraph.engine.quantize`),
spliced in like any other candidate's, with activation ranges calibrated once for every int8 candidate.

A candidate of a rule that quantizes (``Rule.quantizes``: ``int8``) is the conv itself in QDQ form: its input
quantized and dequantized, its weights per channel, its output quantized and dequantized. Timed as a one-layer
model it pays for its own QuantizeLinear/DequantizeLinear pair at each boundary, as a lone int8 conv between
float neighbours does; two int8 convs that share a boundary pay it once, which the search sees when it times
whole prefixes in the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..model.graph import ConvGraph
from ..model.record import ConvRecord
from ..rule import Replacement, Rule

#: Ranges for timing a candidate before any calibration: a layer's time does not depend on its scales.
TIMING_RANGE = (-4.0, 4.0)

Ranges = Mapping[str, Mapping[str, tuple[float, float]]]  # calibration method → tensor → (low, high)


def quantizes(rule: Rule) -> bool:
    """Whether ``rule``'s replacements are quantized by the engine (``int8``)."""
    return bool(getattr(rule, "quantizes", False))


def _region(cg: ConvGraph, rec: ConvRecord):
    from ..engine.quantize import plan

    conv = cg.node(rec.node_id)
    return [conv], plan(cg, [conv], [rec.output], quantize_io=True)


def tensors_to_calibrate(cg: ConvGraph, rec: ConvRecord) -> list[str]:
    """The activations an int8 replacement of ``rec`` needs ranges for (its input and output, unless the
    graph quantizes them already)."""
    return list(_region(cg, rec)[1].calibrate)


def int8_replacement(cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any],
                     ranges: Mapping[str, tuple[float, float]] | None) -> Replacement:
    """Conv ``rec`` in QDQ form; ``ranges`` None: placeholder ranges (for timing only)."""
    from ..engine.quantize import quantize_region, reduce_range, weight_error
    from ..model.weights import constant_value

    nodes, p = _region(cg, rec)
    rng = dict(ranges) if ranges is not None else {t: TIMING_RANGE for t in p.calibrate}
    method, reduce = str(params["calibration"]), reduce_range(str(params["reduce_range"]))
    new, inits = quantize_region(cg, nodes, p, rng, method=method, reduce=reduce, base=rec.node_id)
    w = constant_value(cg, rec.weight)
    err = weight_error([w], new, inits) if w is not None else None
    return Replacement(new, inits, False, f"{rec.kind} (int8)", rec.macs, rec.params, weight_error=err,
                       notes=f"int8, {method} ranges{', 7-bit weights' if reduce else ''}; QDQ: per-channel int8 "
                             f"weights, uint8 activations")


def calibrate(original, cg: ConvGraph, wanted: Iterable[tuple[ConvRecord, Mapping[str, Any]]],
              feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per calibration method, the ranges of every activation the int8 candidates ``wanted`` ((record,
    params) pairs) need, in one run over ``feeds`` per method."""
    from ..engine.quantize import calibrate_ranges

    need: dict[str, set[str]] = {}
    for rec, params in wanted:
        need.setdefault(str(params["calibration"]), set()).update(tensors_to_calibrate(cg, rec))
    return {method: calibrate_ranges(original, sorted(ts), list(feeds), method, types=cg.shapes)
            for method, ts in need.items() if ts}


def ranges_for(ranges: Ranges, cg: ConvGraph, rec: ConvRecord, params: Mapping[str, Any]
               ) -> dict[str, tuple[float, float]] | None:
    """The calibrated ranges an int8 replacement of ``rec`` needs (None when any is missing)."""
    got = ranges.get(str(params["calibration"]), {})
    need = tensors_to_calibrate(cg, rec)
    return {t: got[t] for t in need} if all(t in got for t in need) else None
