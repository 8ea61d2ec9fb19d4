"""Rule ``fold-bn``: a Conv (or ConvTranspose) followed by an inference-mode BatchNormalization, or by per-channel
affine ops (Mul, Add, Sub, Div by constants), → one conv.

BatchNormalization computes y = a·(x − mean) + B per channel with a = scale / √(var + ε); a Mul, Add, Sub or
Div whose other input is a constant scalar or one value per output channel is y = a·x + c too (PP-OCR's
Paddle exports write BatchNormalization that way: Conv → Mul → Add). A chain of them, each the only reader of
the one before, on a conv output is a conv with weights scaled by the product of the a's (per output channel)
and the bias carried through every step. The folded conv keeps the conv's name and writes the chain's last
output. Exact. Runs as a pre-pass, so the other rules see the true weights. ``match`` binds the chain's node
ids (``chain``) for ``build``.
"""

from __future__ import annotations

import numpy as np

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Replacement, Rule, RuleContext, Skip
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
    why = _bn_node(rec, ctx, bn_id, rec.output)
    return (None, why) if why else (bn_id, None)


def _bn_node(rec: ConvRecord, ctx: RuleContext, bn_id: str, x: str) -> str | None:
    """Why BatchNormalization ``bn_id`` cannot be folded into the conv, normalizing tensor ``x`` (None: it can)."""
    node, a = ctx.node(bn_id), attrs(ctx, bn_id)
    if len(node.input) < 5 or node.input[0] != x:
        return "BatchNormalization does not normalize the conv output"
    if a.get("training_mode", 0):
        return "BatchNormalization is in training mode"
    if not a.get("spatial", 1):
        return "BatchNormalization with spatial=0 (per-position statistics)"
    if any(o and ctx.consumers(o) for o in node.output[1:]):
        return "BatchNormalization's running-statistics outputs are read (training)"
    for name, t in zip(BN_PARAMS, node.input[1:5]):
        if constant_source(ctx.graph, t) not in CONSTANT_SOURCES:
            return f"BatchNormalization {name} {t!r} is not a constant"
        v = ctx.value(t)
        if v is None or v.size != rec.out_channels:
            return f"BatchNormalization {name} has {getattr(v, 'size', '?')} values, not {rec.out_channels}"
    return None


#: Element-wise ops that are y = a·x + c per channel when their other input is a constant.
AFFINE = ("Mul", "Add", "Sub", "Div")


def _affine(rec: ConvRecord, ctx: RuleContext, nid: str, x: str, c_out: int | None = None
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, c) per channel (``c_out`` of them: default the conv's output channels) when op ``nid`` computes
    a·x + c from tensor ``x`` and a constant (a scalar or one value per channel, broadcast on (N, C, *spatial)),
    else None."""
    node = ctx.node(nid)
    c_out = rec.out_channels if c_out is None else c_out
    if len(node.input) != 2 or list(node.input).count(x) != 1:
        return None
    other = node.input[1] if node.input[0] == x else node.input[0]
    if constant_source(ctx.graph, other) not in CONSTANT_SOURCES:
        return None
    v = ctx.value(other)
    rank = 2 + rec.spatial_dims
    if v is None or v.dtype.kind != "f" or not np.isfinite(v).all() or v.ndim > rank:
        return None
    if v.size == 1:
        v = np.full(c_out, float(v.reshape(())))
    elif v.size == c_out and v.ndim >= rec.spatial_dims + 1 and v.shape[v.ndim - rec.spatial_dims - 1] == c_out:
        v = v.reshape(-1)
    else:
        return None
    v = v.astype(np.float64)
    ones, zeros = np.ones(c_out), np.zeros(c_out)
    first = node.input[0] == x
    if node.op_type == "Mul":
        return v, zeros
    if node.op_type == "Add":
        return ones, v
    if node.op_type == "Sub":
        return (ones, -v) if first else (-ones, v)
    return (1.0 / v, zeros) if first and np.all(v != 0) else None  # Div: x / v only


def _chain(rec: ConvRecord, ctx: RuleContext) -> tuple[list[str], str | None]:
    """:func:`chain_after`, with why it is empty when it is."""
    chain = chain_after(rec, ctx)
    if chain:
        return chain, None
    _, why = _bn(rec, ctx)
    return chain, (why or "not followed by BatchNormalization").replace(
        "not followed by BatchNormalization", "not followed by BatchNormalization or a Mul/Add/Sub/Div by constants")


def chain_after(rec: ConvRecord, ctx: RuleContext) -> list[str]:
    """The node ids of the BatchNormalizations and affine ops after the conv, each the only reader of the one
    before (and none a graph output): what this rule folds (``fuse-hardswish`` looks past them)."""
    chain: list[str] = []
    out = rec.output
    while True:
        readers = ctx.consumers(out)
        data = [ctx.graph.graph.nodes[n] for n in readers]
        if len(readers) != 1 or data[0]["kind"] != "op" or data[0]["domain"] not in ("", "ai.onnx"):
            break
        nid, op = readers[0], data[0]["op_type"]
        if op == "BatchNormalization":
            if _bn_node(rec, ctx, nid, out) is not None:
                break
        elif op not in AFFINE or _affine(rec, ctx, nid, out) is None:
            break
        chain.append(nid)
        out = ctx.node(nid).output[0]
    return chain


def _before(rec: ConvRecord, ctx: RuleContext) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The affine ops that make a plain Conv's input (in graph order, each read only by the next, the last by the
    conv alone) and their (a, c) per input channel; none when a shift would meet the conv's zero padding (the
    padded border would see c where the original sees 0). PP-OCR det's LearnableAffineBlocks before its
    pointwise convs."""
    c_in = rec.in_channels
    a, c = np.ones(c_in), np.zeros(c_in)
    chain: list[str] = []
    x, reader = rec.input, rec.node_id
    while rec.op_type == "Conv" and ctx.consumers(x) == [reader]:
        nid = ctx.producer(x)
        if nid is None:
            break
        d = ctx.graph.graph.nodes[nid]
        if d["kind"] != "op" or d["op_type"] not in AFFINE or d["domain"] not in ("", "ai.onnx"):
            break
        node = ctx.node(nid)
        moving = [t for t in node.input if t and constant_source(ctx.graph, t) not in CONSTANT_SOURCES]
        got = _affine(rec, ctx, nid, moving[0], c_in) if len(moving) == 1 else None
        if got is None:
            break
        a, c = a * got[0], c + a * got[1]  # the op is applied first: y = a·(a'·x + c') + c
        chain.insert(0, nid)
        x, reader = moving[0], nid
    if chain and any(rec.pads) and np.any(c != 0):
        return [], np.ones(c_in), np.zeros(c_in)
    return chain, a, c


def match(rec: ConvRecord, ctx: RuleContext) -> str | Match:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    chain, why = _chain(rec, ctx)
    before, a, c = _before(rec, ctx)
    if not chain and not before:
        return (why or "not followed by BatchNormalization") + " (nor fed by one)"
    return Match((rec.node_id, *before, *chain), {"chain": chain, "before": before, "in_scale": a, "in_shift": c})


def scaled(w: np.ndarray, b: np.ndarray | None, a: np.ndarray, c: np.ndarray, group: int = 1,
           transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of the conv followed by y = a·x + c per output channel (float64)."""
    bias = a * (np.zeros_like(a) if b is None else b) + c
    if transposed:  # (C_in, C_out/g, *k): output channel G·C_out/g + j of input channel in group G
        c_in, cog = w.shape[:2]
        grouped = w.reshape(group, c_in // group, cog, -1) * a.reshape(group, 1, cog, 1)
        return grouped.reshape(w.shape), bias
    return w * a.reshape((-1,) + (1,) * (w.ndim - 1)), bias


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    found = RULE.matched(rec, ctx, found)
    wt = weights(rec, ctx)
    w_in, b_in, x_in = wt.w, wt.b, rec.input
    if found["before"]:  # conv(a·x + c) = conv'(x): weights scaled per input channel, c through them into the bias
        a_in, c_in = found["in_scale"], found["in_shift"]
        cig = rec.in_channels // rec.group
        per_in = (a_in.reshape(rec.group, 1, cig), c_in.reshape(rec.group, 1, cig))
        w_g = wt.w.reshape(rec.group, -1, cig, int(np.prod(wt.w.shape[2:], dtype=np.int64)))
        w_in = (w_g * per_in[0][..., None]).reshape(wt.w.shape)
        shift = np.einsum("gojk,gj->go", w_g, per_in[1][:, 0, :]).reshape(-1)
        b_in = shift if wt.b is None else wt.b + shift
        x_in = next(t for t in ctx.node(found["before"][0]).input
                    if t and constant_source(ctx.graph, t) not in CONSTANT_SOURCES)
    a, c = np.ones(rec.out_channels), np.zeros(rec.out_channels)
    x = rec.output
    for nid in found["chain"]:  # y = a·x + c so far; each step maps it on
        node = ctx.node(nid)
        if node.op_type == "BatchNormalization":
            scale, beta, mean, var = (ctx.constant(t).astype(np.float64).reshape(-1) for t in node.input[1:5])
            s = scale / np.sqrt(var + float(attrs(ctx, nid).get("epsilon", 1e-5)))
            step = (s, beta - s * mean)
        else:
            got = _affine(rec, ctx, nid, x)
            if got is None:
                raise Skip(f"{node.op_type} {nid!r} is no longer an affine op of constants")
            step = got
        a, c = step[0] * a, step[0] * c + step[1]
        x = node.output[0]
    w, b = scaled(w_in, b_in, a, c, rec.group, rec.op_type == "ConvTranspose")
    base = rec.name or rec.node_id
    w_init = ctx.initializer(f"{base}/folded_W", wt.cast(w))
    b_init = ctx.initializer(f"{base}/folded_B", wt.cast(b))
    conv = ctx.node(rec.node_id)
    new = type(conv)()
    new.CopyFrom(conv)
    del new.input[:]
    new.input.extend([x_in, w_init.name, b_init.name])
    del new.output[:]
    new.output.append(x)
    macs, n_params, kind = estimate(rec, params)
    return Replacement([new], [w_init, b_init], True, kind, macs, n_params, removed=list(found.nodes),
                       weight_error=0.0, notes=wt.notes)


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return rec.macs, rec.params - bias_params(rec) + rec.out_channels, rec.kind


RULE = Rule(
    name="fold-bn",
    summary="Conv/ConvTranspose + inference BatchNormalization or per-channel Mul/Add/Sub/Div by constants → one conv "
            "with folded weights and bias (exact)",
    exact=True,
    params=(),
    match=match,
    build=build,
    estimate=estimate,
    prepass=True,
    op_types=OPS,
)
