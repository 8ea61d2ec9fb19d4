"""Rule ``prune``: drop output channels of a conv and refit the convs that read them (channel pruning).

The match spans a *producer* conv (plain, group 1), the per-channel ops after it (BatchNormalization, Relu,
Sigmoid, HardSigmoid, HardSwish, LeakyRelu, Clip, Tanh, Elu, Selu, Softplus, PRelu, Identity, Mul/Add/Sub/Div
of those tensors with each other — SiLU as Mul(x, Sigmoid(x)) — or with constants of one value per
channel, [C,1,1] / [1,C,1,1], and depthwise convs of one filter per channel, as in MobileNet blocks) and
the *consumer* convs reading the result (plain, group 1). Anything else reading a channel tensor (Concat,
Reshape, a residual Add with another branch, a graph output, a grouped conv…) refuses the match: the
channels would have to be dropped there too.

Dropping channel c removes the producer's filter c (and bias), the per-channel ops' constants of c (a
depthwise conv's filter c), and the consumers' input channel c; MACs and params of the convs shrink by the
share dropped.

* ``keep=dead`` (exact): drop only channels that are provably constant — the producer's filter is all
  zero, so the channel is its bias carried through the per-channel ops (evaluated with onnxruntime;
  e.g. Relu of a negative bias is 0) — folding the constant into the consumers' bias. A nonzero constant
  is folded only into a consumer without padding (zero padding would make its border differ), and only a
  zero passes a depthwise conv between (it leaves the conv's bias everywhere, whatever the padding).
* ``keep=0.5`` / ``channels=N`` (approximate): keep that share / that many channels. With calibration
  statistics of every consumer (``fit=data``): the consumer input's whole-patch covariance Σ (over
  (channel, tap)) gives the least-squares refit of the kept channels, ``W'_K = W_K + W_D Σ_DK Σ_KK⁻¹``
  (He et al., ICCV'17; ThiNet), ridge λ = r · mean(diag Σ) with r the one of 1e-4…1 (or no refit) that errs
  least on the calibration batches held out from the fit, and the bias keeps the mean output
  (``b' = b + W μ − W'_K μ_K``). Channels are chosen greedily: each step drops the channel whose removal
  adds the least refitted output error summed over the consumers, ``tr(W'_c (P_cc)⁻¹ W'_cᵀ)`` with P the
  precision (Σ + λI)⁻¹ (r = 1e-3) of the channels still kept, then updates W' and P (a Schur complement: no
  re-inversion). Where a consumer's patch was too wide for the whole-patch covariance, its per-channel
  covariances are used: a channel scores ``tr(W_c Σ_cc W_cᵀ)`` and a dropped one is replaced by its mean
  (bias correction; no cross-channel refit). Without statistics (``fit=weights``) a channel scores
  ‖producer filter‖₂ × |per-channel scales between| (BatchNormalization's γ/√(var+ε), constant Mul/Div,
  ‖depthwise filter‖₂) ×
  ‖consumer weights reading it‖₂, and the kept weights are not refitted. Provably dead channels go
  first in every mode, folded exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from convgraph.model.record import ConvRecord
from convgraph.rule import Match, Param, Replacement, Rule, RuleContext
from convgraph.model.weights import constant_source

from . import _lsq
from ._common import CONV, CONSTANT_SOURCES, FIT_PARAM, attrs, elem_type, label, opset, plain_conv_reason, weights

#: Ops that act on each channel alone (their other inputs: constants with one value per channel, or scalars).
PER_CHANNEL = {"BatchNormalization", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Clip", "Tanh",
               "Elu", "Selu", "Softplus", "PRelu", "Identity", "Mul", "Add", "Sub", "Div"}
#: Ridge of the greedy choice, relative to the mean diagonal of the consumer's patch covariance.
RIDGE = 1e-3
#: Ridges the final refit chooses from on held-out calibration batches (inf: no refit, only the mean kept).
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, np.inf)


def _keep(text: str) -> "float | str":
    """Parse ``keep``: a share in (0, 1) or ``dead``."""
    if str(text).lower() == "dead":
        return "dead"
    v = float(text)
    if not 0.0 < v < 1.0:
        raise ValueError("must be a share in (0, 1) or 'dead'")
    return v


def _channels(text: str) -> "int | None":
    v = int(text)
    if v < 1:
        raise ValueError("must be a positive integer")
    return v


@dataclass
class Span:
    """The nodes a pruning spans: per-channel ops (in graph order; depthwise convs of one filter per channel
    among them) with the channel axis of each constant input (None: a scalar, kept as is), and the consumer
    convs."""

    tensors: set[str]
    ops: list[str]
    axes: dict[tuple[str, int], "int | None"]  # (op id, input slot) -> channel axis of that constant
    consumers: list[str]

    def depthwise(self, ctx: RuleContext) -> list[str]:
        """The depthwise convs among the ops."""
        return [n for n in self.ops if ctx.node(n).op_type == "Conv"]


def _const_axis(v: np.ndarray | None, c: int, op: str) -> "tuple[int | None, str | None]":
    """(channel axis or None for a scalar, None) of a constant input of a per-channel op, or (None, why not)."""
    if v is None:
        return None, "is not a constant"
    if v.size == 1:
        return None, None
    if op in ("BatchNormalization", "Conv"):  # parameters / depthwise weight and bias: one row per channel
        ok = v.shape[0] == c and (op == "Conv" or v.ndim == 1)
        return (0, None) if ok else (None, f"has shape {list(v.shape)}, not [{c}]")
    # broadcast against (N, C, *spatial): one value per channel needs C at axis -3 and 1 elsewhere
    if v.ndim >= 3 and v.shape[-3] == c and v.size == c:
        return v.ndim - 3, None
    return None, f"has shape {list(v.shape)}, not one value per channel ([{c},1,1] or [1,{c},1,1])"


def _span(rec: ConvRecord, ctx: RuleContext) -> "tuple[Span | None, str | None]":
    """The per-channel ops and consumer convs reading ``rec``'s output channels, or why they cannot be pruned."""
    nodes, c = ctx.graph.graph._node, int(rec.out_channels)  # networkx's node dict: plain lookups
    consumers_of, records = ctx.graph.consumers, ctx.records
    tensors, ops, consumers, seen = {rec.output}, [], [], set()
    todo = [rec.output]
    while todo:
        t = todo.pop()
        readers = consumers_of(t)
        if not readers:
            return None, f"channel tensor {t!r} is not read"
        for n in readers:
            d = nodes[n]
            kind = d["kind"]
            if kind == "output":
                return None, f"channel tensor {t!r} is a graph output"
            if kind != "op":
                return None, f"channel tensor {t!r} is read by a {kind} node"
            if n in seen:
                continue
            seen.add(n)
            p, op = d["proto"], d["op_type"]
            if d["domain"] not in ("", "ai.onnx") or d["subgraphs"]:
                return None, f"channel tensor {t!r} feeds {_what(d, n)}, which is not a per-channel op or a conv"
            if op == "Conv":
                crec = records.get(n)
                if crec is None:
                    return None, f"channel tensor {t!r} feeds {_what(d, n)}, rewritten earlier in this pass"
                inputs = p.input
                if inputs[0] != t or t in inputs[1:]:
                    return None, f"channel tensor {t!r} is a weight or bias of {_what(d, n)}"
                why = plain_conv_reason(crec, ctx)
                if why:
                    return None, f"conv {_what(d, n)}: {why}"
                if crec.group == crec.in_channels == crec.out_channels == c:  # depthwise: a per-channel op
                    ops.append(n)
                    tensors.add(crec.output)
                    todo.append(crec.output)
                    continue
                if crec.group != 1:
                    return None, (f"consumer {_what(d, n)} is grouped (group={crec.group}): dropping an input channel "
                                  "would drop its output channels too (only a depthwise conv of one filter per "
                                  "channel is carried through)")
                consumers.append(n)
            elif op in PER_CHANNEL:
                if op == "BatchNormalization" and (attrs(ctx, n).get("training_mode", 0)
                                                   or any(o and consumers_of(o) for o in p.output[1:])):
                    return None, f"{_what(d, n)} is in training mode"
                out = p.output[0]
                ops.append(n)
                tensors.add(out)
                todo.append(out)
            else:
                return None, f"channel tensor {t!r} feeds {_what(d, n)}, which is not a per-channel op or a conv"
    if not consumers:
        return None, "its channels reach no conv"
    axes = {}
    for n in ops:
        p = nodes[n]["proto"]
        for i, t in enumerate(p.input):
            if not t or t in tensors:
                continue
            what = _what(nodes[n], n)
            if constant_source(ctx.graph, t) not in CONSTANT_SOURCES:
                return None, f"{what} mixes in {t!r} from outside the pruned channels (another branch)"
            axes[(n, i)], why = _const_axis(ctx.value(t), c, p.op_type)
            if why:
                return None, f"{what} input {t!r} {why}"
    if len(ops) > 1:
        ops.sort(key=lambda n: nodes[n]["order"])
    return Span(tensors, ops, axes, consumers), None


def _what(d: dict, n: str) -> str:
    """``<op type> <name>`` of a node (its data ``d``, its id ``n``) in a reason."""
    return f"{d['op_type']} {d['proto'].name or n!r}"


def _constants(rec: ConvRecord, ctx: RuleContext, span: Span, values: np.ndarray) -> dict[str, np.ndarray]:
    """Node id -> (C,) value at its input, for the consumers and the depthwise convs between, when the
    producer's output channels are ``values`` everywhere (the ops evaluated by onnxruntime on a 1×1 map:
    exact for position-wise ops; a depthwise conv is exact there only on a zero input, see :func:`_dead`)."""
    from convgraph.run.runtime import create_session, run

    nodes = [ctx.node(n) for n in span.ops]
    readers = span.consumers + span.depthwise(ctx)
    outs = sorted({ctx.records[n].input for n in readers})
    inits = []
    for n, p in zip(span.ops, nodes):
        inits += [onnx.numpy_helper.from_array(ctx.constant(t), t) for i, t in enumerate(p.input) if (n, i) in span.axes]
    c, elem = len(values), elem_type(ctx, rec.output) or onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(p.op_type, p.input, p.output[:1], name=p.name, domain=p.domain, **{
            a.name: helper.get_attribute_value(a) for a in p.attribute}) for p in nodes],
        "channels", [helper.make_tensor_value_info(rec.output, elem, [1, c, 1, 1])],
        [helper.make_tensor_value_info(t, elem, None) for t in outs],
        list({t.name: t for t in inits}.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset(ctx))])
    x = values.astype(helper.tensor_dtype_to_np_dtype(elem)).reshape(1, c, 1, 1)
    got = dict(zip(outs, run(create_session(model, opt_level="disable"), {rec.output: x}, outs)))
    return {n: got[ctx.records[n].input].astype(np.float64).reshape(-1) for n in readers}


def _padded(rec: ConvRecord) -> bool:
    if rec.auto_pad not in ("", "NOTSET", "VALID"):
        return any(k > 1 for k in rec.kernel)
    return any(p for p in rec.pads or ())


def _dead(rec: ConvRecord, ctx: RuleContext, span: Span) -> "tuple[list[int], dict[str, np.ndarray]]":
    """(Channels provably constant at every consumer's input and foldable into its bias, consumer -> values)."""
    wt = weights(rec, ctx)
    zero = ~np.any(wt.w.reshape(wt.w.shape[0], -1) != 0, axis=1)
    if not zero.any():
        return [], {}
    b = np.zeros(wt.w.shape[0]) if wt.b is None else wt.b
    values = _constants(rec, ctx, span, b)
    ok = zero.copy()
    for n, v in values.items():  # a depthwise conv keeps a channel constant (its bias) whatever its padding
        ok &= np.isfinite(v) & ((v == 0) | (n in span.consumers and not _padded(ctx.records[n])))  # only on zeros
    return [int(i) for i in np.flatnonzero(ok)], values


def _count(rec: ConvRecord, params: dict) -> int:
    c = int(rec.out_channels)
    if params.get("channels") is not None:
        return int(params["channels"])
    return max(1, int(round(float(params["keep"]) * c)))


def match(rec: ConvRecord, ctx: RuleContext) -> "str | Match":
    why = plain_conv_reason(rec, ctx)
    if why:
        return why
    if rec.group != 1:
        return f"producer is grouped (group={rec.group}): its filters are tied to its input channels"
    if rec.graph:
        return "inside a subgraph"
    span, why = _span(rec, ctx)
    if span is None:
        return why or "nothing reads its channels"
    params = {p.name: p.default for p in RULE.params} | dict(ctx.params)
    binding: dict[str, Any] = {"span": span}
    if params["keep"] == "dead":
        dead, values = _dead(rec, ctx, span)
        if not dead:
            return "no channel is provably constant (an all-zero filter) and foldable into the consumers' bias"
        if len(dead) == rec.out_channels:
            return "every channel is constant: the consumers' inputs do not depend on the producer at all"
        binding.update(dead=dead, values=values)
    elif _count(rec, params) >= rec.out_channels:
        return f"keeping {_count(rec, params)} of {rec.out_channels} channels drops none"
    return Match((rec.node_id, *span.ops, *span.consumers), binding)


# ---- choosing the channels and refitting -------------------------------------------------------------------
def _matrix(rec: ConvRecord, ctx: RuleContext) -> np.ndarray:
    """A consumer's weight as (O, C, taps), float64."""
    w = weights(rec, ctx).w
    return w.reshape(w.shape[0], w.shape[1], -1)


def _greedy(ws: list[np.ndarray], covs: list[np.ndarray], drop: int) -> list[int]:
    """Drop ``drop`` channels one at a time, each the one adding the least refitted output error over the
    consumers (ridge :data:`RIDGE`); returns the dropped channels in that order."""
    c = ws[0].shape[1]
    state = []
    for w, s in zip(ws, covs):
        k = w.shape[2]
        lam = RIDGE * max(float(np.trace(s)) / s.shape[0], 1e-12)
        state.append((w.reshape(w.shape[0], -1).copy(), np.linalg.inv(s + lam * np.eye(s.shape[0])), k))
    alive, dropped = np.ones(c, bool), []
    for _ in range(drop):
        score = np.zeros(c)
        for w, p, k in state:
            blocks = p.reshape(c, k, c, k)[np.arange(c), :, np.arange(c), :]  # (C, K, K) diagonal blocks
            blocks = blocks + np.where(alive, 0.0, 1.0)[:, None, None] * np.eye(k)  # dropped: any invertible
            inv = np.linalg.inv(blocks)
            wc = w.reshape(w.shape[0], c, k)
            score += np.einsum("ock,ckl,ocl->c", wc, inv, wc)
        score[~alive] = np.inf
        j = int(np.argmin(score))
        for w, p, k in state:
            idx = slice(j * k, (j + 1) * k)
            a = np.linalg.inv(p[idx, idx])
            w -= w[:, idx] @ a @ p[idx, :]  # the kept columns take over what channel j explained
            p -= p[:, idx] @ a @ p[idx, :]
            w[:, idx] = 0.0
            p[idx, :] = p[:, idx] = 0.0
        alive[j] = False
        dropped.append(j)
    return dropped


def _refit(w: np.ndarray, keep: np.ndarray, cov: np.ndarray, ridge: float) -> np.ndarray:
    """(O, C, K) weights on the ``keep`` channels (others zero) minimizing the output error under ``cov``:
    W'_K = W_K + W_D Σ_DK (Σ_KK + λI)⁻¹, λ = ``ridge`` · mean(diag Σ); W_K alone for an infinite ridge."""
    o, c, k = w.shape
    mask = np.zeros(c, bool)
    mask[keep] = True
    cols = np.repeat(mask, k)
    flat = w.reshape(o, -1)
    out = np.zeros_like(flat)
    out[:, cols] = flat[:, cols]
    if np.isfinite(ridge) and (~cols).any():
        skk = cov[np.ix_(cols, cols)]
        lam = ridge * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        out[:, cols] += np.linalg.solve(skk + lam * np.eye(len(skk)), cov[np.ix_(cols, ~cols)] @ flat[:, ~cols].T).T
    return out.reshape(o, c, k)


def _held_error(w: np.ndarray, new: np.ndarray, fit, held) -> float:
    """Squared output error on the held-out batches ``held`` of ``new`` for ``w``, the bias keeping ``fit``'s mean."""
    a = (w - new).reshape(w.shape[0], -1)
    m2 = held.full[0] / max(held.count, 1)
    off = a @ fit.mean.reshape(-1)
    return float(np.einsum("od,de,oe->", a, m2, a) - 2 * off @ (a @ held.mean.reshape(-1)) + off @ off)


def _ridge(ws: list[np.ndarray], stats: list, keep: np.ndarray) -> "tuple[float, str]":
    """The ridge of :data:`RIDGES` whose refit (on the fitting batches) errs least on the held-out ones."""
    parts = [s.split() for s in stats]
    if any(p is None or p[0].full is None or p[1].full is None for p in parts):
        return RIDGE, f"ridge {RIDGE:g}"
    errs = [sum(_held_error(w, _refit(w, keep, f.full_cov()[0], r), f, h) for w, (f, h) in zip(ws, parts))
            for r in RIDGES]
    best = RIDGES[int(np.argmin(errs))]
    return best, ("no refit beat keeping the mean on held-out batches" if not np.isfinite(best)
                  else f"ridge {best:g} chosen on held-out batches")


def _choose(rec: ConvRecord, ctx: RuleContext, params: dict, span: Span, ws: list[np.ndarray]):
    """(dropped channels, refitted consumer weights (O, C, K), consumer means (C, K) or None, how)."""
    c = int(rec.out_channels)
    drop = c - _count(rec, params)
    stats = [_lsq.stats(ctx.records[n], ctx) for n in span.consumers] if params["fit"] == "data" else []
    if stats and all(s is not None and s.full is not None for s in stats):
        covs = [s.full_cov()[0] for s in stats]
        dropped = _greedy(ws, covs, drop)
        keep = np.setdiff1d(np.arange(c), dropped)
        ridge, note = _ridge(ws, stats, keep)
        return dropped, [_refit(w, keep, cov, ridge) for w, cov in zip(ws, covs)], [s.mean for s in stats], (
            f"chosen and refitted by least squares on calibration patches ({min(s.count for s in stats)} per "
            f"channel; {note})")
    if stats and all(s is not None for s in stats):
        score = sum(np.einsum("ock,ckl,ocl->c", w, s.cov(), w) for w, s in zip(ws, stats))
        dropped = [int(i) for i in np.argsort(score, kind="stable")[:drop]]
        return dropped, ws, [s.mean for s in stats], (
            "chosen on per-channel calibration covariances (patch too wide for the whole-patch one); "
            "dropped channels replaced by their mean")
    wt = weights(rec, ctx)
    gain = np.ones(c)
    for n in span.ops:
        p = ctx.node(n)
        if p.op_type == "BatchNormalization":
            scale, _, _, var = (ctx.constant(t).astype(np.float64).reshape(-1) for t in p.input[1:5])
            gain *= np.abs(scale) / np.sqrt(var + float(attrs(ctx, n).get("epsilon", 1e-5)))
        elif p.op_type == "Conv":  # depthwise
            gain *= np.linalg.norm(ctx.constant(p.input[1]).astype(np.float64).reshape(c, -1), axis=1)
        elif p.op_type in ("Mul", "Div"):
            for i in (0, 1):
                if (n, i) in span.axes:
                    v = np.abs(ctx.constant(p.input[i]).astype(np.float64)).reshape(-1) * np.ones(c)
                    gain *= v if p.op_type == "Mul" or i == 0 else 1.0 / np.maximum(v, 1e-30)
    score = (np.linalg.norm(wt.w.reshape(c, -1), axis=1) * gain
             * np.sqrt(sum(np.sum(w * w, axis=(0, 2)) for w in ws)))
    dead, _ = _dead(rec, ctx, span)
    score[dead] = -1.0
    why = "calibration statistics missing for a consumer; " if stats else ""
    dropped = [int(i) for i in np.argsort(score, kind="stable")[:drop]]
    return dropped, ws, None, why + "chosen by weight norms (producer × per-channel scales × consumers), not refitted"


def build(rec: ConvRecord, ctx: RuleContext, params: dict, found: Match | None = None) -> Replacement:
    found = RULE.matched(rec, ctx, found)
    span: Span = found["span"]
    c = rec.out_channels
    cons = [ctx.records[n] for n in span.consumers]
    ws = [_matrix(r, ctx) for r in cons]
    biases = [b if (b := weights(r, ctx).b) is not None else np.zeros(r.out_channels) for r in cons]
    exact = params["keep"] == "dead"
    if exact:
        dropped, new_ws, means, how = found["dead"], ws, None, "provably constant channels folded into the bias"
    else:
        dropped, new_ws, means, how = _choose(rec, ctx, params, span, ws)
    keep = np.setdiff1d(np.arange(c), dropped)
    new_bs = []
    if means is not None:  # the mean output is kept: b' = b + W μ − W' μ
        for w, w2, b, m in zip(ws, new_ws, biases, means):
            new_bs.append(b + np.einsum("ock,ck->o", w - w2 * np.isin(np.arange(c), keep)[None, :, None], m))
    else:  # only what is provably constant is folded (exactly)
        dead, values = (found["dead"], found["values"]) if exact else _dead(rec, ctx, span)
        gone = np.intersect1d(dropped, dead).astype(int)
        for n, w, b in zip(span.consumers, ws, biases):
            new_bs.append(b + (w[:, gone, :].sum(axis=2) @ values[n][gone] if len(gone) else 0.0))
    return _replacement(rec, ctx, span, keep, cons, new_ws, new_bs, exact, how)


def _replacement(rec, ctx, span, keep, cons, new_ws, new_bs, exact, how) -> Replacement:
    c, base = int(rec.out_channels), label(rec)
    rename = {t: ctx.name(f"{t}/pruned") for t in span.tensors}
    wt = weights(rec, ctx)
    inits = [ctx.initializer(f"{base}/pruned_W", wt.cast(wt.w[keep]))]
    if wt.b is not None:
        inits.append(ctx.initializer(f"{base}/pruned_B", wt.cast(wt.b[keep])))
    producer = _copy(ctx.node(rec.node_id), [rec.input] + [t.name for t in inits], [rename[rec.output]])
    nodes = [producer]
    for n in span.ops:
        p = ctx.node(n)
        ins = []
        for i, t in enumerate(p.input):
            axis = span.axes.get((n, i))
            if t in rename:
                ins.append(rename[t])
            elif axis is None:
                ins.append(t)
            else:
                v = ctx.value(t)
                init = ctx.initializer(f"{t}/pruned", np.ascontiguousarray(np.take(v, keep, axis=axis)))
                inits.append(init)
                ins.append(init.name)
        new = _copy(p, ins, [rename[p.output[0]]])
        if p.op_type == "Conv":  # depthwise: one group per kept channel
            del new.attribute[:]
            new.attribute.extend(helper.make_attribute(a.name, len(keep)) if a.name == "group" else a
                                 for a in p.attribute)
        nodes.append(new)
    for r, w, b in zip(cons, new_ws, new_bs):
        cw = weights(r, ctx)
        kept = w[:, keep].reshape((w.shape[0], len(keep)) + tuple(r.kernel))
        wi = ctx.initializer(f"{label(r)}/pruned_W", cw.cast(kept))
        bi = ctx.initializer(f"{label(r)}/pruned_B", cw.cast(b))
        inits += [wi, bi]
        nodes.append(_copy(ctx.node(r.node_id), [rename[r.input], wi.name, bi.name], [r.output]))
    share, convs = len(keep) / c, [rec, *(ctx.records[n] for n in span.depthwise(ctx)), *cons]
    macs_before = None if any(x.macs is None for x in convs) else sum(x.macs for x in convs)
    macs_after = None if macs_before is None else sum(int(round(x.macs * share)) for x in convs)
    p_before = sum(x.params for x in convs)
    p_after = sum(_bias_and_weights(x, share, len(keep) if x.has_bias else 0) for x in convs[:-len(cons)]) + sum(
        _bias_and_weights(x, share, x.out_channels) for x in cons)  # the consumers all get a bias
    return Replacement(nodes, inits, exact, rec.kind, macs_after, p_after,
                       removed=[rec.node_id, *span.ops, *span.consumers],
                       notes=f"kept {len(keep)} of {c} channels, {len(span.consumers)} consumer(s); {how}",
                       macs_before=macs_before, params_before=p_before)


def _bias_and_weights(rec: ConvRecord, share: float, bias: int) -> int:
    """Params of ``rec`` with ``share`` of its weights and ``bias`` biases."""
    return int(round((rec.params - (rec.out_channels if rec.has_bias else 0)) * share)) + bias


def _copy(p: onnx.NodeProto, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(p)
    del new.input[:], new.output[:]
    new.input.extend(inputs)
    new.output.extend(outputs)
    return new


def consumers(rec: ConvRecord, ctx: RuleContext) -> list[str]:
    """The consumer convs a pruning of ``rec`` refits: those whose calibration statistics it needs."""
    span, _ = _span(rec, ctx)
    return list(span.consumers) if span is not None else []


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    """The producer conv's own MACs and params after pruning (the consumers shrink by the same share)."""
    c = int(rec.out_channels or 0)
    if params.get("keep") == "dead" or not c:
        return rec.macs, rec.params, rec.kind
    k = min(_count(rec, params), c)
    macs = None if rec.macs is None else int(round(rec.macs * k / c))
    return macs, _bias_and_weights(rec, k / c, k if rec.has_bias else 0), rec.kind


RULE = Rule(
    name="prune",
    summary="drop a conv's least useful output channels and refit its consumer convs (least squares on calibration "
            "data); keep=dead removes provably constant channels exactly",
    exact=lambda p: p.get("keep") == "dead",
    params=(
        Param("keep", 0.5, "share of the producer's output channels kept, in (0, 1), or 'dead': only provably "
                           "constant channels (exact)", _keep),
        Param("channels", None, "output channels kept (overrides keep)", _channels),
        FIT_PARAM,
    ),
    match=match,
    build=build,
    estimate=estimate,
    calibrates=consumers,
    op_types=CONV,
)
