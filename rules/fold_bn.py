"""Rule ``fold-bn``: a Conv (or ConvTranspose) followed by an inference-mode BatchNormalization → one conv.

BatchNormalization computes y = a·(x − mean) + B per channel with a = scale / √(var + ε); on a conv
output that is a conv with weights scaled by a (per output channel) and bias a·(b − mean) + B. The
folded conv keeps the conv's name and writes the BatchNormalization's output. Exact. Runs as a
pre-pass, so the other rules see the true weights. ``match`` binds the BatchNormalization (``bn``) for
``build``.
"""

from __future__ import annotations

import numpy as np

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Replacement, Rule, RuleContext
from convgraph.model.weights import constant_source

from ._common import CONSTANT_SOURCES, attrs, bias_params, plain_conv_reason, weights

BN_PARAMS = ("scale", "B", "mean", "var")


#: The op types this rule rewrites.
OPS = ("Conv", "ConvTranspose")


def _bn(rec: ConvRecord, ctx: RuleContext) -> tuple[str | None, str | None]:
    """(BatchNormalization node id, None) when the conv output feeds only one, else (None, why not)."""
    readers = ctx.consumers(rec.output)
    if not readers:
        return None, "its output is not read"
    nodes = ctx.graph.graph.nodes
    data = [nodes[n] for n in readers]
    if len(readers) > 1 or data[0]["kind"] != "op" or data[0]["op_type"] != "BatchNormalization":
        if any(d["kind"] == "output" for d in data):
            return None, "its output is a graph output"
        if not any(d.get("op_type") == "BatchNormalization" for d in data):
            return None, "not followed by BatchNormalization"
        return None, f"its output has {len(readers)} readers, not only the BatchNormalization"
    bn_id, bn = readers[0], data[0]
    if bn["domain"] not in ("", "ai.onnx"):
        return None, f"BatchNormalization of domain {bn['domain']!r}"
    node, a = bn["proto"], attrs(ctx, bn_id)
    if len(node.input) < 5 or node.input[0] != rec.output:
        return None, "BatchNormalization does not normalize the conv output"
    if a.get("training_mode", 0):
        return None, "BatchNormalization is in training mode"
    if not a.get("spatial", 1):
        return None, "BatchNormalization with spatial=0 (per-position statistics)"
    if any(o and ctx.consumers(o) for o in node.output[1:]):
        return None, "BatchNormalization's running-statistics outputs are read (training)"
    for name, t in zip(BN_PARAMS, node.input[1:5]):
        if constant_source(ctx.graph, t) not in CONSTANT_SOURCES:
            return None, f"BatchNormalization {name} {t!r} is not a constant"
        v = ctx.value(t)
        if v is None or v.size != rec.out_channels:
            return None, f"BatchNormalization {name} has {getattr(v, 'size', '?')} values, not {rec.out_channels}"
    return bn_id, None


def match(rec: ConvRecord, ctx: RuleContext) -> str | Match:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    bn_id, why = _bn(rec, ctx)
    if bn_id is None:
        return why or "not followed by BatchNormalization"
    return Match((rec.node_id, bn_id), {"bn": bn_id})


def fold(w: np.ndarray, b: np.ndarray | None, scale: np.ndarray, beta: np.ndarray, mean: np.ndarray,
         var: np.ndarray, eps: float, group: int = 1, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of the conv with the BatchNormalization folded in (float64)."""
    a = scale / np.sqrt(var + eps)
    bias = (np.zeros_like(mean) if b is None else b) - mean
    if transposed:  # (C_in, C_out/g, *k): output channel G·C_out/g + j of input channel in group G
        c_in, cog = w.shape[:2]
        grouped = w.reshape(group, c_in // group, cog, -1) * a.reshape(group, 1, cog, 1)
        return grouped.reshape(w.shape), a * bias + beta
    return w * a.reshape((-1,) + (1,) * (w.ndim - 1)), a * bias + beta


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    found = RULE.matched(rec, ctx, found)
    bn_id = found["bn"]
    wt = weights(rec, ctx)
    bn = ctx.node(bn_id)
    scale, beta, mean, var = (ctx.constant(t).astype(np.float64).reshape(-1) for t in bn.input[1:5])
    eps = float(attrs(ctx, bn_id).get("epsilon", 1e-5))
    w, b = fold(wt.w, wt.b, scale, beta, mean, var, eps, rec.group, rec.op_type == "ConvTranspose")
    base = rec.name or rec.node_id
    w_init = ctx.initializer(f"{base}/folded_W", wt.cast(w))
    b_init = ctx.initializer(f"{base}/folded_B", wt.cast(b))
    conv = ctx.node(rec.node_id)
    new = type(conv)()
    new.CopyFrom(conv)
    del new.input[:]
    new.input.extend([rec.input, w_init.name, b_init.name])
    del new.output[:]
    new.output.append(bn.output[0])
    macs, n_params, kind = estimate(rec, params)
    return Replacement([new], [w_init, b_init], True, kind, macs, n_params, removed=list(found.nodes),
                       weight_error=0.0, notes=wt.notes)


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return rec.macs, rec.params - bias_params(rec) + rec.out_channels, rec.kind


RULE = Rule(
    name="fold-bn",
    summary="Conv/ConvTranspose + inference BatchNormalization → one conv with folded weights and bias (exact)",
    exact=True,
    params=(),
    match=match,
    build=build,
    estimate=estimate,
    prepass=True,
    op_types=OPS,
)
