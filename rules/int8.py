"""Rule ``int8``: a float conv → the same conv in QDQ form, which onnxruntime runs as an int8 kernel (QLinearConv).

The rule puts in a copy of the conv and asks the engine to quantize it (``Replacement.quantize``): after the
pass the engine calibrates the activation ranges it needs on ``--calib`` (one run over the data, onnxruntime's
calibrator for ``calibration``) and quantizes each conv alone with onnxruntime's ``quantize_static``
(:mod:`convgraph.engine.quantize`): per-channel symmetric int8 weights, uint8 activations (on x86 onnxruntime's fastest
int8 conv kernels take u8 activations × s8 weights), int32 bias; an input that a DequantizeLinear already makes
(an int8 neighbour's output) keeps that quantization. Never exact: each conv's error alone (the QDQ conv against
the float one, on the activations the rewritten model feeds it) is in the report.

``calibration``: ``entropy`` (default: the range whose uint8 histogram keeps the KL divergence from the data's
least, onnxruntime's EntropyCalibrater with 512 bins into 256), ``percentile`` (99.999th percentile of |x|, 2048
bins) or ``minmax``. Measured on YOLOv8n's class scores and PP-OCR det's text map, each image judged alone on
images outside the calibration set, with 16 and with 32 calibration images (README, "int8"): entropy kept the
worst image best over both models and both sets (0.834; percentile 0.724, minmax 0.634). ``reduce_range``:
``auto`` (default: 7-bit weights on x86 CPUs without VNNI, where onnxruntime's u8s8 kernels can saturate),
``yes`` or ``no``.
"""

from __future__ import annotations

import onnx

from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext

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


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
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
    return None


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    conv = ctx.node(rec.node_id)
    new = type(conv)()
    new.CopyFrom(conv)
    return Replacement([new], [], False, estimate(rec, params)[2], rec.macs, rec.params,
                       notes=f"int8 QDQ: per-channel int8 weights, uint8 activations, {params['calibration']} ranges",
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
        Param("reduce_range", "auto", "7-bit weights: 'auto' (on x86 CPUs without VNNI, where onnxruntime's u8s8 "
              "kernels can saturate), 'yes' or 'no'", _choice(("auto", "yes", "no"))),
    ),
    match=match,
    build=build,
    estimate=estimate,
    saves_macs=False,
    quantizes=True,
)
