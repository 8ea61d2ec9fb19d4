"""Rule ``fuse-hardswish``: a conv whose output goes through HardSwish written out as element-wise ops,
x · clip(x + 3, 0, 6) / 6 (Add → Clip → Mul → Div, or the Div as a Mul by 1/6), → the conv and one activation op.

Paddle's exports (PP-OCR det's PP-LCNetV3 backbone: 24 of them) write every HardSwish that way, and onnxruntime
runs the four ops one by one over the whole tensor: on PP-OCR det 640 at 1 thread they cost 6–7 ms of 85.
The replacement is onnx's HardSwish (opset 14 and later) or, below opset 14, HardSigmoid(α = 1/6, β = ½) times
x — the same function, x · max(0, min(1, x/6 + ½)): exact up to float rounding (PP-OCR det's map moved 2e-5).
Scale and shift ops between the conv and the activation (a BatchNormalization, or one written out as Mul → Add)
stay as they are. A pre-pass, like ``fold-bn``, and to run before it: ``fold-bn`` folds a scale that makes a
conv's input into that conv, and would take the activation's last Div with it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Replacement, RuleContext

from ._common import attrs, exact_prepass, label, opset, plain_conv_reason, unchanged
from .fold_bn import chain_after

#: The op types this rule rewrites.
OPS = ("Conv", "ConvTranspose")


def _scalar(ctx: RuleContext, tensor: str) -> float | None:
    v = ctx.value(tensor) if tensor else None
    return float(np.asarray(v).reshape(())) if v is not None and v.size == 1 and v.dtype.kind == "f" else None


def _only_reader(ctx: RuleContext, tensor: str, op_type: str) -> str | None:
    """The node id of the one op of ``op_type`` (default domain) that alone reads ``tensor``, else None."""
    readers = ctx.consumers(tensor)
    if len(readers) != 1:
        return None
    d = ctx.graph.graph.nodes[readers[0]]
    ok = d["kind"] == "op" and d["op_type"] == op_type and d["domain"] in ("", "ai.onnx")
    return readers[0] if ok else None


def _clip_bounds(ctx: RuleContext, nid: str) -> tuple[float | None, float | None]:
    node = ctx.node(nid)
    a = attrs(ctx, nid)
    lo = _scalar(ctx, node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("min")
    hi = _scalar(ctx, node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("max")
    return lo, hi


def _hardswish(rec: ConvRecord, ctx: RuleContext) -> tuple[list[str] | None, str]:
    """(the scale/shift ops after the conv, then the Add, Clip, Mul and Div/Mul node ids; "") when the conv's
    output goes through written-out HardSwish and nowhere else, else (None, why not)."""
    between = chain_after(rec, ctx)  # a BatchNormalization (or one as Mul → Add): it stays, for fold-bn
    x = ctx.node(between[-1]).output[0] if between else rec.output
    readers = ctx.consumers(x)
    data = {r: ctx.graph.graph.nodes[r] for r in readers}
    if len(readers) != 2 or any(d["kind"] != "op" or d["domain"] not in ("", "ai.onnx") for d in data.values()):
        return None, "its output is not read by exactly an Add and a Mul (HardSwish written out)"
    add = next((r for r, d in data.items() if d["op_type"] == "Add"), None)
    mul = next((r for r, d in data.items() if d["op_type"] == "Mul"), None)
    if add is None or mul is None:
        return None, "its output is not read by exactly an Add and a Mul (HardSwish written out)"
    three = [_scalar(ctx, t) for t in ctx.node(add).input if t != x]
    if len(three) != 1 or three[0] != 3.0:
        return None, "the Add does not add 3"
    clip = _only_reader(ctx, ctx.node(add).output[0], "Clip")
    if clip is None or _clip_bounds(ctx, clip) != (0.0, 6.0):
        return None, "the Add is not followed by Clip(0, 6) alone"
    if sorted(ctx.node(mul).input) != sorted([x, ctx.node(clip).output[0]]) or ctx.consumers(
            ctx.node(clip).output[0]) != [mul]:
        return None, "the Mul does not multiply the conv's output by the Clip"
    out = ctx.node(mul).output[0]
    last = _only_reader(ctx, out, "Div") or _only_reader(ctx, out, "Mul")
    if last is None:
        return None, "the product is not divided by 6 alone"
    k = [_scalar(ctx, t) for t in ctx.node(last).input if t != out]
    want = 6.0 if ctx.node(last).op_type == "Div" else 1 / 6
    if len(k) != 1 or k[0] is None or not np.isclose(k[0], want, rtol=1e-6, atol=0) or ctx.node(last).input[0] != out:
        return None, "the product is not divided by 6"
    return [*between, add, clip, mul, last], ""


def match(rec: ConvRecord, ctx: RuleContext) -> str | Match:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    ops, why = _hardswish(rec, ctx)
    return why if ops is None else Match((rec.node_id, *ops), {"ops": ops[-4:], "between": ops[:-4]})


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    found = RULE.matched(rec, ctx, found)
    kept = []
    for nid in [rec.node_id, *found["between"]]:  # the conv and its scale/shift ops, as they are
        node = onnx.NodeProto()
        node.CopyFrom(ctx.node(nid))
        kept.append(node)
    x, y = kept[-1].output[0], ctx.node(found["ops"][-1]).output[0]
    base = label(rec)
    if opset(ctx) >= 14:
        act = [helper.make_node("HardSwish", [x], [y], name=f"{base}/hardswish")]
    else:
        gate = ctx.name(f"{base}/hardsigmoid")
        act = [helper.make_node("HardSigmoid", [x], [gate], name=gate, alpha=1 / 6, beta=0.5),
               helper.make_node("Mul", [x, gate], [y], name=f"{base}/hardswish")]
    macs, n_params, kind = unchanged(rec, params)
    return Replacement([*kept, *act], [], True, kind, macs, n_params, removed=list(found.nodes), weight_error=0.0,
                       notes="HardSwish in one op" if len(act) == 1 else "HardSwish as HardSigmoid · x (opset < 14)")


RULE = exact_prepass(
    "fuse-hardswish",
    "conv + HardSwish written out (x·clip(x+3,0,6)/6) → conv + HardSwish in one op (exact)",
    match, build, OPS)
