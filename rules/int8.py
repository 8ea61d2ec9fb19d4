"""Rule ``int8``: a float conv → the same conv in QDQ form, which onnxruntime runs as an int8 kernel (QLinearConv).

The activation that alone reads the conv's output joins it (:func:`activation_after`: SiLU's Sigmoid and Mul,
LeakyRelu, Relu, Clip), so that onnxruntime runs it on int8 too and the next int8 conv reads int8 values. The
rule puts in a copy of the conv (and activation) and asks the engine to quantize it (``Replacement.quantize``):
after the pass the engine calibrates the activation ranges it needs on ``--calib`` (one run over the data, onnxruntime's
calibrator for ``calibration``) and quantizes each conv alone with onnxruntime's ``quantize_static``
(:mod:`convgraph.engine.quantize`): per-channel symmetric int8 weights, uint8 activations (on x86 onnxruntime's fastest
int8 conv kernels take u8 activations × s8 weights), int32 bias; an input that a DequantizeLinear already makes
(an int8 neighbour's output) keeps that quantization. Never exact: each conv's error alone (the QDQ conv against
the float one, on the activations the rewritten model feeds it) is in the report.

``calibration``: ``entropy`` (default: the range whose uint8 histogram keeps the KL divergence from the data's
least, onnxruntime's EntropyCalibrater with 512 bins into 256), ``percentile`` (99.999th percentile of |x|, 2048
bins) or ``minmax``. Measured on YOLOv8n's class scores and PP-OCR det's text map, each image judged alone on
images outside the calibration set, with 16 and with 32 calibration images (README, "int8"): entropy kept the
worst image best over both models and both sets (0.839; percentile 0.727, minmax 0.433; re-measured with the
activations in the units). ``reduce_range``:
``auto`` (default: 7-bit weights on x86 CPUs without VNNI, where onnxruntime's u8s8 kernels can saturate),
``yes`` or ``no``.
"""

from __future__ import annotations

import onnx

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Param, Replacement, Rule, RuleContext

from ._common import elem_type, plain_conv_reason

CALIBRATIONS = ("entropy", "percentile", "minmax")
DEFAULT_CALIBRATION = "entropy"


def _choice(values: tuple[str, ...]):
    def parse(text: str) -> str:
        t = str(text).strip().lower()
        if t not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return t

    parse.__name__ = parse.__qualname__ = f"one_of_{'_'.join(values)}"
    return parse


#: Activations quantized with the conv they follow: onnxruntime runs them on int8 (QLinearSigmoid, QLinearMul,
#: QLinearLeakyRelu; Relu and Clip fold into the conv's output range), so the conv's output is never dequantized
#: for them and an int8 neighbour reads the unit's output without a float round trip.
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid")


def activation_after(rec: ConvRecord, ctx: RuleContext) -> list[str]:
    """The node ids of the activation that follows conv ``rec`` and joins its int8 unit: SiLU (``x·σ(x)``:
    Sigmoid and Mul reading the conv's output, the Sigmoid read by the Mul only), or one of
    :data:`ACTIVATIONS` that alone reads it; none when the output is read by anything else."""
    g = ctx.graph

    def op(nid: str) -> onnx.NodeProto | None:  # None for a graph output or another domain's op
        d = g.graph.nodes[nid]
        return d["proto"] if d["kind"] == "op" and d["domain"] in ("", "ai.onnx") else None

    readers = sorted(set(ctx.consumers(rec.output)))
    nodes = {r: op(r) for r in readers}
    if any(n is None for n in nodes.values()):
        return []
    kinds = {r: n.op_type for r, n in nodes.items() if n is not None}
    if len(readers) == 1 and kinds[readers[0]] in ACTIVATIONS:
        return readers
    if len(readers) == 2 and sorted(kinds.values()) == ["Mul", "Sigmoid"]:
        sig = next(r for r in readers if kinds[r] == "Sigmoid")
        mul = next(r for r in readers if kinds[r] == "Mul")
        s = ctx.node(sig).output[0]
        if sorted(ctx.node(mul).input) == sorted([rec.output, s]) and ctx.consumers(s) == [mul]:
            return [sig, mul]
    return []


def match(rec: ConvRecord, ctx: RuleContext) -> str | Match | None:
    if rec.graph:
        return "inside an If/Loop/Scan body: its activations cannot be calibrated (only main-graph tensors can be read)"
    if rec.weight_source == "DequantizeLinear":
        return "already quantized (its weights come through DequantizeLinear)"
    why = plain_conv_reason(rec, ctx)
    if why:
        return why
    if elem_type(ctx, rec.weight) != onnx.TensorProto.FLOAT:
        return "int8 is calibrated from float32 models: quantize the float32 model, not this one"
    if rec.spatial_dims not in (1, 2, 3):
        return f"{rec.spatial_dims}D conv: onnxruntime's int8 conv takes 1D, 2D and 3D"
    after = activation_after(rec, ctx) if ctx.params.get("activation", "int8") == "int8" else []
    return Match((rec.node_id, *after)) if after else None


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    ids = list(found.nodes) if found is not None else [rec.node_id]
    nodes = []
    for nid in ids:
        new = onnx.NodeProto()
        new.CopyFrom(ctx.node(nid))
        nodes.append(new)
    acts = "+".join(n.op_type for n in nodes[1:])
    return Replacement(nodes, [], False, estimate(rec, params)[2], rec.macs, rec.params, removed=ids,
                       notes=f"int8 QDQ: per-channel int8 weights, uint8 activations, {params['calibration']} ranges"
                             + (f"; its {acts} in int8 too" if acts else ""),
                       quantize={"calibration": params["calibration"], "reduce_range": params["reduce_range"]})


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return rec.macs, rec.params, f"{rec.kind} (int8)"


RULE = Rule(
    name="int8",
    summary="float conv → QDQ int8 conv (onnxruntime's quantizer: per-channel int8 weights, uint8 activations "
            "calibrated on --calib); never exact",
    exact=False,
    params=(
        Param("calibration", DEFAULT_CALIBRATION, "how activation ranges are calibrated on --calib: "
              f"{', '.join(CALIBRATIONS)} (onnxruntime's calibrators)", _choice(CALIBRATIONS)),
        Param("activation", "int8", "the activation after the conv (SiLU, LeakyRelu, Relu, Clip): 'int8' quantizes "
              "it with the conv (onnxruntime runs it on int8, no float round trip), 'float' leaves it float "
              "between the conv's DequantizeLinear and the next QuantizeLinear", _choice(("int8", "float"))),
        Param("reduce_range", "auto", "7-bit weights: 'auto' (on x86 CPUs without VNNI, where onnxruntime's u8s8 "
              "kernels can saturate), 'yes' or 'no'", _choice(("auto", "yes", "no"))),
    ),
    match=match,
    build=build,
    estimate=estimate,
    saves_macs=False,
    quantizes=True,
)
