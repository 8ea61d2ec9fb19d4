"""Rule ``softmax-conv``: a pointwise conv that reads a softmax over its channels, Σᵢ wᵢ·softmax(x)ᵢ + b →
Σᵢ wᵢ·eᵢ / Σᵢ eᵢ + b with e = exp(x − max x): the same conv on the exponentials, divided by their sum.

YOLOv8's (and YOLOv9–11's) detection head ends in one: its distribution focal loss (DFL) decodes each box side as
the expectation of a 16-bin softmax, a 1×1 conv with weights 0…15 over a softmax on axis 1. onnxruntime runs a
softmax over a non-last axis by transposing to the last and back, row by row over 16 values: YOLOv8n 320's DFL
softmax is its most expensive op at 1 thread (1.4 ms of 21). The replacement reduces along axis 1 for the whole
tensor at once (ReduceMax, Sub, Exp, the conv, ReduceSum, Div): exact up to float rounding (YOLOv8n's output moved
3e-7 relative), 1.07× on the whole model. Softmax from opset 13 (earlier it flattens from its axis on: another
function); a pre-pass, like ``fold-bn``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Replacement, RuleContext

from ._common import attrs, exact_prepass, label, opset, plain_conv_reason, unchanged

#: The op types this rule rewrites.
OPS = ("Conv",)


def match(rec: ConvRecord, ctx: RuleContext) -> str | Match:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    if rec.group != 1 or any(k != 1 for k in rec.kernel) or any(s != 1 for s in rec.strides) or any(rec.pads):
        return "not a pointwise conv (1×1 kernel, stride 1, no padding, group 1)"
    sm = ctx.producer(rec.input)
    d = ctx.graph.graph.nodes[sm] if sm is not None else None
    if sm is None or d is None or d["kind"] != "op" or d["op_type"] != "Softmax" or d["domain"] not in ("", "ai.onnx"):
        return "its input is not made by a Softmax"
    if opset(ctx) < 13:
        return f"opset {opset(ctx)}: Softmax before opset 13 normalizes over every axis from its own on"
    rank = 2 + rec.spatial_dims
    if attrs(ctx, sm).get("axis", -1) % rank != 1:
        return "the Softmax is not over the conv's channels (axis 1)"
    if ctx.consumers(rec.input) != [rec.node_id]:
        return "the Softmax's output is read by more than the conv"
    return Match((sm, rec.node_id), {"softmax": sm})


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    found = RULE.matched(rec, ctx, found)
    x = ctx.node(found["softmax"]).input[0]
    base = label(rec)
    names = {k: ctx.name(f"{base}/{k}") for k in ("axes", "max", "shifted", "exp", "weighted", "sum", "ratio")}
    axes = numpy_helper.from_array(np.array([1], np.int64), names["axes"])
    if opset(ctx) >= 18:
        top = helper.make_node("ReduceMax", [x, names["axes"]], [names["max"]], name=names["max"], keepdims=1)
    else:
        top = helper.make_node("ReduceMax", [x], [names["max"]], name=names["max"], axes=[1], keepdims=1)
    conv = onnx.NodeProto()
    conv.CopyFrom(ctx.node(rec.node_id))
    del conv.input[2:]  # the bias goes after the division
    conv.input[0], conv.output[0] = names["exp"], names["weighted"]
    bias = ctx.value(rec.bias) if rec.bias else None
    inits = [axes]
    divided = rec.output if bias is None else names["ratio"]
    nodes = [top, helper.make_node("Sub", [x, names["max"]], [names["shifted"]], name=names["shifted"]),
             helper.make_node("Exp", [names["shifted"]], [names["exp"]], name=names["exp"]), conv,
             helper.make_node("ReduceSum", [names["exp"], names["axes"]], [names["sum"]], name=names["sum"],
                              keepdims=1),
             helper.make_node("Div", [names["weighted"], names["sum"]], [divided], name=names["ratio"])]
    if bias is not None:
        b = ctx.name(f"{base}/bias")
        inits.append(numpy_helper.from_array(bias.reshape(1, -1, *([1] * rec.spatial_dims)), b))
        nodes.append(helper.make_node("Add", [divided, b], [rec.output], name=ctx.name(f"{base}/add_bias")))
    macs, n_params, kind = unchanged(rec, params)
    return Replacement(nodes, inits, True, kind, macs, n_params, removed=list(found.nodes), weight_error=0.0,
                       notes="softmax over the channels as exp / sum around the conv (no transposes)")


RULE = exact_prepass(
    "softmax-conv",
    "pointwise conv over a channel Softmax (YOLOv8's DFL) → the conv on exp(x − max) divided by their sum (exact)",
    match, build, OPS)
