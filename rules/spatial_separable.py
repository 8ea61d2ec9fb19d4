"""Rule ``spatial-separable``: a 2D k_h×k_w Conv → a k_h×1 depthwise conv, then a 1×k_w conv.

Design (rank r per input channel). The filters that read input channel c, W[o, c] for the outputs o
of c's group, form the matrix M_c[(o, x), y] = W[o, c, y, x] of size (C_out/g·k_w) × k_h. Its
truncated SVD (Eckart–Young: the best rank-r approximation) gives r vertical filters per channel and,
for each output, r horizontal ones: W'[o, c] = Σ_j v_cj ⊗ h_ocj. The vertical filters form one
depthwise k_h×1 conv with depth multiplier r (channel c·r + j), the horizontal ones a 1×k_w conv with
the original group that sums them into the outputs (and takes the bias). So every filter has rank ≤ r,
and the filters reading one channel share its r vertical profiles.

* Exact at ``rank=full`` = min(k_h, C_out/g·k_w), and at any rank where the dropped singular values
  vanish (reported per node from them, relative tolerance 1e-6): e.g. a Sobel or box filter on each
  channel, or any single-output conv of rank-1 filters. The rank is trimmed to the largest numerical
  rank of the channels, so ``rank=full`` on rank-1 kernels costs rank 1.
* MACs ≈ r/k_h + r·g/(C_out·k_w) of the original (3×3, 64 channels, rank 1: 0.34×); full rank costs
  about as much as the original (exact, not faster).
* Strides, pads, dilations and auto_pad split by axis: the vertical conv takes those of the height,
  the horizontal one those of the width. The cheap depthwise conv runs first (at output height, input
  width), the channel-mixing conv last at the output resolution.

Why not the alternatives: one vertical conv per output (C_out·r channels, dense first) costs the same
MACs but runs its dense conv at the input width, slower with strides; factoring each W[o, c] on its own
needs C_out·C_in/g·r intermediate channels. A rank over the whole layer (Jaderberg et al.'s K shared
intermediate channels, both convs dense) is a different rule: it fits trained weights better per MAC
but is not per filter, and is not exact for per-filter rank-1 kernels at low K.

With calibration statistics the factors are refitted by alternating least squares in each channel's
patch metric (starting from the SVD) and the bias corrected for the mean shift.
"""

from __future__ import annotations

import numpy as np

from convgraph import fit
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext, int_or_full

from . import _lsq
from ._common import (
    CONV, FIT_PARAM, Names, bias_params, capped_rank, exact_at_full_rank, fit_rows, geometry, label,
    out_elements, plain_conv_reason, response_param, split_geometry, weights,
)
from .separable import factor

#: Alternating least-squares sweeps of the data-aware fit.
ALS_ITERS = 8


def full_rank(rec: ConvRecord) -> int:
    """The rank at which the factorization is exact: min(k_h, C_out/g·k_w)."""
    kh, kw = rec.kernel
    return min(kh, rec.out_channels // rec.group * kw)


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = plain_conv_reason(rec, ctx)
    if why:
        return why
    if rec.spatial_dims != 2:
        return f"{rec.spatial_dims}D conv: k×1 · 1×k factors are for 2D kernels"
    if rec.in_channels is None or rec.out_channels is None:
        return "channel counts unknown"
    kh, kw = rec.kernel
    if kh == 1 and kw == 1:
        return "1×1 kernel: nothing to separate"
    if kh == 1 or kw == 1:
        return f"{kh}×{kw} kernel is already one-dimensional"
    return None


def _als(w: np.ndarray, group: int, v: np.ndarray, st) -> tuple[np.ndarray, np.ndarray]:
    """Vertical (C, r, kh) and horizontal (C, Og, r, kw) factors fitted on calibration patches, from ``v``.

    Minimizes Σ_c Σ_o (w'_oc − t_oc)ᵀ Σ_c (w'_oc − t_oc) per input channel c (Σ_c its patch covariance,
    t the target: the original filter, seen through the reference's patches when there are some):
    each half-step is a linear least-squares problem in one factor.
    """
    c, r, kh = v.shape
    og, kw = w.shape[0] // group, w.shape[3]
    cov = fit.damped(st.cov(), fit.DAMP).reshape(c, kh, kw, kh, kw)  # (C, K, K), taps (y, x)
    wc = fit.per_channel(w, group)  # (C, Og, K)
    rhs = np.einsum("cok,ckl->col", wc, st.cross_cov()).reshape(c, og, kh, kw)  # E[(w·x_ref) x]

    def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # a (C, n, n), b (C, n, m): a tiny ridge
        n = a.shape[-1]
        a = a + 1e-9 * np.einsum("cii->c", a)[:, None, None] / n * np.eye(n)
        return fit.solve(a, b)

    def h_given(v: np.ndarray) -> np.ndarray:  # one (r·kw)² system per channel, its outputs as right-hand sides
        a = np.einsum("cjy,cyxzw,clz->cjxlw", v, cov, v, optimize=True).reshape(c, r * kw, r * kw)
        b = np.einsum("cjy,coyx->cjxo", v, rhs).reshape(c, r * kw, og)
        return solve(a, b).reshape(c, r, kw, og).transpose(0, 3, 1, 2)

    for _ in range(ALS_ITERS):
        h = h_given(v)
        a = np.einsum("cojx,cyxzw,colw->cjylz", h, cov, h, optimize=True).reshape(c, r * kh, r * kh)
        b = np.einsum("cojx,coyx->cjy", h, rhs).reshape(c, r * kh, 1)
        v = solve(a, b).reshape(c, r, kh)
    return v, h_given(v)


def compose(v: np.ndarray, h: np.ndarray, group: int) -> np.ndarray:
    """The effective kernel (C_out, C_in/g, kh, kw) of vertical (C, r, kh) and horizontal (C, Og, r, kw) factors."""
    c, og = v.shape[0], h.shape[1]
    cg = c // group
    w = np.einsum("cjy,cojx->coyx", v, h)  # (C, Og, kh, kw)
    return w.reshape(group, cg, og, *w.shape[2:]).transpose(0, 2, 1, 3, 4).reshape(group * og, cg, *w.shape[2:])


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    wt = weights(rec, ctx)
    g, c_in, c_out = rec.group, rec.in_channels, rec.out_channels
    cig, cog = c_in // g, c_out // g
    kh, kw = rec.kernel
    r = capped_rank(params["rank"], full_rank(rec))
    # M_c[(o, x), y]: the separable rule's per-channel SVD with "outputs" (o, x) and "taps" y
    wq = wt.w.transpose(0, 3, 1, 2).reshape(c_out * kw, cig, kh)
    dw, pw, _ = factor(wq, g, full_rank(rec))  # all singular values, to judge the numerical rank
    sv = np.sum(dw**2, axis=-1)  # (g, Cig, R): σ_j (each factor carries √σ_j)
    total = float(np.sum(sv**2))
    tol = _lsq.EXACT_TOL * float(np.sqrt(total))
    r = max(1, min(r, int(np.max(np.sum(sv > tol, axis=-1)))))
    err = float(np.sqrt(np.sum(sv[..., r:] ** 2) / total)) if total > 0 else 0.0
    v = dw[..., :r, :].reshape(c_in, r, kh)  # (C, r, kh)
    h = pw[..., :r].reshape(g, cig, cog, kw, r).transpose(0, 1, 2, 4, 3).reshape(c_in, cog, r, kw)
    new_bias = None  # the original bias tensor is kept unless calibration corrects it
    how = "SVD of the weights"
    st = _lsq.stats(rec, ctx) if params["fit"] == "data" else None
    if st is not None and err > _lsq.EXACT_TOL:
        rows = fit_rows(st, params)
        if rows is None:
            v, h = _als(wt.w, g, v, st)
        else:  # the fit of the scaled rows D^{1/2}W, the horizontal factor (it carries the outputs) scaled back
            v, h = _als(fit.scaled_rows(wt.w, None, rows)[0], g, v, st)
            h = (h.reshape(g, cig, cog, r, kw) / np.sqrt(rows).reshape(g, 1, cog, 1, 1)).reshape(h.shape)
        w_new = compose(v, h, g)
        new_bias = fit.corrected_bias(wt.w, w_new, wt.b, st)
        err = _lsq.rel_error(wt.w.reshape(1, -1), w_new.reshape(1, -1))
        how = (f"fitted on calibration patches ({st.count} per channel{_lsq.response_note(st, rows)}), "
               f"output error {fit.layer_error(wt.w, w_new, st):.3g}")

    names = Names(ctx, label(rec))
    geo = geometry(ctx, rec.node_id)
    v_geo, h_geo = split_geometry(geo)
    v_init = names.init("v_W", wt.cast(v.reshape(c_in * r, 1, kh, 1)))
    h_w = h.reshape(g, cig, cog, r, kw).transpose(0, 2, 1, 3, 4).reshape(c_out, cig * r, 1, kw)  # in: c·r + j
    h_init = names.init("h_W", wt.cast(h_w))
    inits = [v_init, h_init]
    mid = names.tensor("v")
    nodes = [names.node("Conv", [rec.input, v_init.name], [mid], "v", kernel_shape=[kh, 1], group=c_in, **v_geo)]
    h_inputs = [mid, h_init.name]
    if new_bias is not None:
        b_init = names.init("h_B", wt.cast(new_bias))
        inits.append(b_init)
        h_inputs.append(b_init.name)
    elif rec.bias:
        h_inputs.append(rec.bias)
    h_attrs = {"group": g} if g > 1 else {}
    nodes.append(names.node("Conv", h_inputs, [rec.output], "h", kernel_shape=[1, kw], **h_attrs, **h_geo))
    macs, n_params, kind = _cost(rec, r)
    notes = f"rank {r} of {full_rank(rec)} per input channel; {how}" + (f"; {wt.notes}" if wt.notes else "")
    return Replacement(nodes, inits, err <= _lsq.EXACT_TOL, kind, macs, n_params, weight_error=err, notes=notes)


def _cost(rec: ConvRecord, r: int) -> tuple[int | None, int, str]:
    c_in, c_out, g = rec.in_channels, rec.out_channels, rec.group
    kh, kw = rec.kernel
    n_out = out_elements(rec.output_shape)
    macs = None
    if n_out is not None and rec.input_shape is not None and isinstance(rec.input_shape[-1], int):
        w_in, w_out = rec.input_shape[-1], (rec.output_shape or (None,))[-1]
        macs = n_out // w_out * w_in * c_in * r * kh + n_out * c_out * (c_in // g) * r * kw
    n_params = c_in * r * kh + c_out * (c_in // g) * r * kw + bias_params(rec)
    horizontal = "standard" if g == 1 else ("depthwise" if g == c_in and c_in // g * r == 1 else "grouped")
    return macs, n_params, f"depthwise+{horizontal}"


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return _cost(rec, capped_rank(params["rank"], full_rank(rec)))


RULE = Rule(
    name="spatial-separable",
    summary="2D k×k conv → k×1 depthwise (r per channel) + 1×k conv, by per-channel SVD (exact at rank=full "
            "or for rank-1 kernels such as Sobel)",
    exact=exact_at_full_rank,
    params=(
        Param("rank", 1, "vertical filters per input channel: an integer, or 'full' (exact)", int_or_full),
        FIT_PARAM,
        response_param("pre"),
    ),
    match=match,
    build=build,
    estimate=estimate,
    op_types=CONV,
)
