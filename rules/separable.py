"""Rule ``separable``: a standard (or grouped) k×k Conv → depthwise k×k (multiplier r) + pointwise 1×1.

For each input channel c the slice W[:, c] (C_out/g × prod(k)) is factored by SVD; its best rank-r
approximation (Eckart–Young) U_r S_r V_rᵀ gives r depthwise filters (√S·V rows, applied to channel c)
and r pointwise columns (U·√S). Exact when r ≥ min(C_out/g, prod(k)) (``rank=full``). Strides, pads,
auto_pad and dilations go to the depthwise conv, the bias to the pointwise one; a grouped conv keeps its
group in the pointwise conv. For r > 1 two layouts compute the same thing:

* ``multiplier``: one depthwise conv with depth multiplier r (channel c·r + j);
* ``tiled``: the input channels repeated r times (one Concat, after a Split when grouped; a Tile runs
  as fast but needs the shape for grouped convs) into a multiplier-1 depthwise conv, which onnxruntime
  runs with its fast depthwise kernels.

``layout=auto`` picks ``tiled`` for 2D convs whose depthwise stage has at least 16 channels and
``multiplier`` otherwise (1D/3D, tiny stems): measured with onnxruntime CPU, one thread
(benchmarks/bench_separable.py), tiled is 1.2–2.4× faster for 2D, and 1.1–2.9× slower for 1D and 3D
and for 3-channel stems.
"""

from __future__ import annotations

import numpy as np

from convgraph import fit
from convgraph.model.arithmetic import prod
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext, int_or_full

from . import _lsq
from ._common import (
    CONV, FIT_PARAM, Names, bias_params, capped_rank, channel_mixing_reason, exact_at_full_rank, fit_rows, geometry, label,
    opset, out_elements, response_param, weights,
)

LAYOUTS = ("auto", "multiplier", "tiled")
#: layout=auto tiles 2D convs whose depthwise stage has at least this many channels (C_in·r).
TILED_MIN_CHANNELS = 16


def _layout(text: str) -> str:
    if text not in LAYOUTS:
        raise ValueError(f"must be one of {', '.join(LAYOUTS)}")
    return text


def full_rank(rec: ConvRecord) -> int:
    """The rank at which the factorization is exact: min(C_out/g, prod(kernel))."""
    return min(int(rec.out_channels) // rec.group, prod(rec.kernel))


def layout_of(rec: ConvRecord, r: int, layout: str) -> str:
    """``multiplier`` or ``tiled`` for rank ``r`` (rank 1 needs no tiling: both are the same)."""
    if r == 1:
        return "multiplier"
    if layout != "auto":
        return layout
    return "tiled" if rec.spatial_dims == 2 and rec.in_channels * r >= TILED_MIN_CHANNELS else "multiplier"


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = channel_mixing_reason(rec, ctx, "already depthwise (one input channel per group)")
    if why:
        return why
    if prod(rec.kernel) == 1:
        return "1×1 kernel: already pointwise"
    return None


def factor(w: np.ndarray, group: int, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """SVD of each input channel's slice of ``w`` (C_out, C_in/g, *k).

    Returns depthwise filters (g, C_in/g, r, K), pointwise columns (g, C_in/g, C_out/g, r) and the
    relative Frobenius error of the rank-r weight.
    """
    c_out, cig = w.shape[:2]
    m = w.reshape(group, c_out // group, cig, -1).transpose(0, 2, 1, 3)  # (g, Cig, Cog, K)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[..., :rank])
    dw = vt[..., :rank, :] * root[..., :, None]
    pw = u[..., :rank] * root[..., None, :]
    total = float(np.sum(s**2))
    err = float(np.sqrt(np.sum(s[..., rank:] ** 2) / total)) if total > 0 else 0.0
    return dw, pw, err


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    wt = weights(rec, ctx)
    g, c_in, c_out = rec.group, rec.in_channels, rec.out_channels
    cig, cog, kernel, nd = c_in // g, c_out // g, rec.kernel, rec.spatial_dims
    r = capped_rank(params["rank"], full_rank(rec))
    layout = layout_of(rec, r, params["layout"])
    dw, pw, err = factor(wt.w, g, r)
    bias, how = wt.b, ""
    st = _lsq.stats(rec, ctx) if params["fit"] == "data" else None
    if st is not None:  # data-aware: whitened SVD / ALS on calibration patches (convgraph.fit)
        rows = fit_rows(st, params)
        f = fit.separable_fit(wt.w, wt.b, r, st, rows=rows)
        dw, pw, bias = f.depthwise.reshape(g, cig, r, -1), f.pointwise.reshape(g, cig, cog, r), f.bias
        w_new = f.weight(kernel, g)
        err = _lsq.rel_error(wt.w.reshape(1, -1), w_new.reshape(1, -1))
        how = (f"; fitted on calibration patches ({f.method}{_lsq.response_note(st, rows)}), "
               f"output error {fit.layer_error(wt.w, w_new, st):.3g}")
    if layout == "tiled":  # channel G·Cig·r + j·Cig + c: each group's channels repeated r times
        dw = dw.transpose(0, 2, 1, 3)
        pw = pw.transpose(0, 2, 3, 1)  # (g, Cog, r, Cig)
    else:  # channel c·r + j
        pw = pw.transpose(0, 2, 1, 3)  # (g, Cog, Cig, r)
    dw_w = dw.reshape(c_in * r, 1, *kernel)
    pw_w = pw.reshape(c_out, cig * r, *(1,) * nd)

    names = Names(ctx, label(rec))
    nodes, inits = [], []
    x = rec.input
    if layout == "tiled":
        x, tile_nodes = _tile(names, x, g, r)
        nodes += tile_nodes
    dw_init = names.init("dw_W", wt.cast(dw_w))
    pw_init = names.init("pw_W", wt.cast(pw_w))
    inits += [dw_init, pw_init]
    mid = names.tensor("dw")
    nodes.append(names.node("Conv", [x, dw_init.name], [mid], "dw", kernel_shape=list(kernel),
                            group=c_in * r if layout == "tiled" else c_in, **geometry(ctx, rec.node_id)))
    pw_inputs = [mid, pw_init.name]
    if bias is not None:
        b_init = names.init("pw_B", wt.cast(bias))
        inits.append(b_init)
        pw_inputs.append(b_init.name)
    pw_attrs = {"group": g} if g > 1 else {}
    nodes.append(names.node("Conv", pw_inputs, [rec.output], "pw", kernel_shape=[1] * nd, **pw_attrs))
    macs, n_params, kind = estimate(rec, params)
    exact = r >= full_rank(rec) and (st is None or f.method == "exact")
    notes = f"rank {r} of {full_rank(rec)}, layout {layout}{how}" + (f"; {wt.notes}" if wt.notes else "")
    return Replacement(nodes, inits, exact, kind, macs, n_params, weight_error=err, notes=notes)


def _tile(names: Names, x: str, group: int, r: int) -> tuple[str, list]:
    """``x``'s channels repeated r times, per group (one Concat; a Split first when grouped)."""
    parts = [x]
    nodes = []
    if group > 1:
        parts = [names.tensor(f"split{i}") for i in range(group)]
        extra = {"num_outputs": group} if opset(names.ctx) >= 18 else {}  # before 18: equal parts by default
        nodes.append(names.node("Split", [x], parts, "split", axis=1, **extra))
    tiled = names.tensor("tiled")
    nodes.append(names.node("Concat", [p for p in parts for _ in range(r)], [tiled], "tile", axis=1))
    return tiled, nodes


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    r = capped_rank(params["rank"], full_rank(rec))
    c_in, c_out, g, k = rec.in_channels, rec.out_channels, rec.group, prod(rec.kernel)
    n = out_elements(rec.output_shape)
    macs = None if n is None else n * (c_in * r * k + c_out * (c_in // g) * r)
    n_params = c_in * r * k + c_out * (c_in // g) * r + bias_params(rec)
    return macs, n_params, "depthwise+pointwise" if g == 1 else "depthwise+pointwise_grouped"


RULE = Rule(
    name="separable",
    summary="standard k×k conv → depthwise k×k (multiplier r) + pointwise 1×1, by per-channel SVD (exact at rank=full)",
    exact=exact_at_full_rank,
    params=(
        Param("rank", 1, "depthwise filters per input channel: an integer, or 'full' (exact)", int_or_full),
        FIT_PARAM,
        response_param("pre"),
        Param("layout", "auto", "for rank > 1: 'multiplier' (one depthwise conv, multiplier r), 'tiled' "
              "(input channels repeated r times, multiplier-1 depthwise), or 'auto' (tiled for 2D)", _layout),
    ),
    match=match,
    build=build,
    estimate=estimate,
    op_types=CONV,
)
