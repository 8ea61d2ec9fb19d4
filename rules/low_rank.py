"""Rule ``low-rank``: a conv factored through R intermediate channels shared by the whole layer.

The per-channel rules (``separable``, ``spatial-separable``) give every input channel its own filters; a
rank over the whole layer lets all channels share R basis responses, which fits trained weights far
better per MAC. Two forms, both keeping the conv's group structure (R intermediate channels per group):

* ``spatial`` (Jaderberg, Vedaldi and Zisserman 2014, scheme 2): a 2D k_h×k_w conv C→N becomes a k_h×1
  conv C→R (the original's vertical strides, pads and dilation) then a 1×k_w conv R→N (the horizontal
  ones, and the bias). Best weights: the truncated SVD of each group's M[(c, y), (n, x)] = W[n, c, y, x];
  exact at ``rank=full`` = min(C/g·k_h, N/g·k_w). MACs ≈ R·(C·k_h·W_in/W_out + N·k_w)/g per output
  position.
* ``channel``: a k×k conv C→R then a 1×1 conv R→N (SVD / Tucker-2 on the output side), for any kernel and
  1D/2D/3D. Best weights: the truncated SVD of W reshaped (N/g, C/g·prod(k)); exact at ``rank=full`` =
  min(N/g, C/g·prod(k)). MACs R·(C/g·prod(k) + N/g) per output position and group.

``form=auto`` (default) takes ``spatial`` for 2D kernels with k_h > 1 and k_w > 1, else ``channel``:
on YOLOv8n's 39 trained 3×3 convs the spatial form had the lower held-out output error at equal MACs on
every layer, data-aware fits both (benchmarks/bench_optimize.py --layers yolov8n --low-rank).

``rank``: R per group, an integer, ``full`` (exact), or a share of the full rank such as ``1/4`` or
``0.25`` (rounded, at least 1; the default is ``1/4``: half the MACs of a square 3×3 conv in the spatial
form). The rank is trimmed to the weights' numerical rank (the largest over groups), so ``rank=full`` of a
rank-deficient kernel costs only that rank, and the rewrite is exact per node whenever the dropped
singular values vanish (relative tolerance 1e-6); the weight error reported is the dropped singular
values' share of the norm.

With calibration statistics (``fit=data``, the default when the engine has them) the factors minimize the
layer's output error on real activations (:func:`convgraph.fit.low_rank_fit`): in the metric of the
whole-patch input covariance where it was kept (``(C/g)·prod(k)`` ≤ 2304), else of the per-channel
covariances (channels taken as uncorrelated: the notes say which); channel form in closed form (reduced-
rank regression), spatial form by alternating least squares from a Kronecker-whitened SVD; the method
chosen on held-out calibration batches; the bias corrected for the mean shift.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

from convgraph import fit
from convgraph.model.arithmetic import prod
from convgraph.model.convops import classify
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext

from . import _lsq
from ._common import (
    CONV, FIT_PARAM, Names, bias_params, capped_rank, channel_mixing_reason, exact_at_full_rank, fit_rows,
    geometry, label, out_elements, response_param, split_geometry, weights,
)

FORMS = ("auto", "spatial", "channel")
#: The default rank: this share of the full rank.
DEFAULT_RANK = "1/4"


@functools.lru_cache(maxsize=64)  # pure, and the analyzer asks for every conv: parsing a Fraction is slow
def parse_rank(text: str) -> "int | str":
    """A rank: a positive integer, ``full``, or a share of the full rank in (0, 1] (``1/4``, ``0.25``),
    kept as the normalized string ``p/q`` (``full`` for 1)."""
    t = str(text).strip().lower()
    if t == "full":
        return t
    if t.isdigit():
        if int(t) < 1:
            raise ValueError("must be a positive integer, 'full' or a share of the full rank such as 1/4")
        return int(t)
    try:
        f = Fraction(t)
    except (ValueError, ZeroDivisionError):
        raise ValueError("must be a positive integer, 'full' or a share of the full rank such as 1/4") from None
    if not 0 < f <= 1:
        raise ValueError("a share of the full rank must be in (0, 1]")
    return "full" if f == 1 else f"{f.numerator}/{f.denominator}"


def _form(text: str) -> str:
    if text not in FORMS:
        raise ValueError(f"must be one of {', '.join(FORMS)}")
    return text


def form_of(rec: ConvRecord, form: str) -> str:
    """``spatial`` or ``channel`` (``auto``: spatial for 2D kernels larger than 1 in both dims)."""
    if form != "auto":
        return form
    return "spatial" if rec.spatial_dims == 2 and min(rec.kernel) > 1 else "channel"


def second_taps(rec: ConvRecord, form: str) -> int:
    """Taps of the second conv: k_w (spatial form) or 1 (channel form)."""
    return rec.kernel[-1] if form == "spatial" else 1


def full_rank(rec: ConvRecord, form: str) -> int:
    """The rank per group at which the factorization is exact: min(C/g·k_first, N/g·k_second)."""
    q = second_taps(rec, form)
    return min(rec.in_channels // rec.group * (prod(rec.kernel) // q), rec.out_channels // rec.group * q)


@functools.lru_cache(maxsize=64)
def _share(text: str) -> Fraction:
    return Fraction(text)


def rank_of(rec: ConvRecord, params: dict) -> int:
    """The rank per group asked for: the ``rank`` param resolved against (and capped at) the full rank."""
    full = full_rank(rec, form_of(rec, params["form"]))
    r = params["rank"]
    if not isinstance(r, int):  # a share given from Python as a float or Fraction, not parsed yet
        r = parse_rank(str(r))
    if isinstance(r, str) and r != "full":  # a share p/q of the full rank, rounded half up: ⌊p·full/q + 1/2⌋
        share = _share(r)
        p, q = share.numerator, share.denominator
        return max(1, min(full, (2 * p * full + q) // (2 * q)))
    return capped_rank(r, full)


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = channel_mixing_reason(rec, ctx, "one input channel per group (depthwise): no channels to share a basis; "
                                          "see spatial-separable")
    if why:
        return why
    try:
        form = form_of(rec, _form(str(ctx.params.get("form", "auto"))))
    except ValueError as e:
        return f"bad form: {e}"
    if form == "spatial":
        if rec.spatial_dims != 2:
            return f"{rec.spatial_dims}D conv: the spatial form factors 2D kernels (use form=channel)"
        kh, kw = rec.kernel
        if kh == 1 or kw == 1:
            return f"{kh}×{kw} kernel: nothing to split into k×1 · 1×k (use form=channel)"
    return None


def _fit_note(st) -> str:
    if st.full is not None:
        return "whole-patch covariance"
    return "per-channel covariances (the whole-patch covariance was not kept: channels taken as uncorrelated)"


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    wt = weights(rec, ctx)
    g, c_in, c_out, kernel, nd = rec.group, rec.in_channels, rec.out_channels, rec.kernel, rec.spatial_dims
    form = form_of(rec, params["form"])
    q = second_taps(rec, form)
    full = full_rank(rec, form)
    r = rank_of(rec, params)
    f = fit.low_rank_fit(wt.w, None, full, None, second_taps=q, group=g)  # every component, largest first
    sv = f.singular  # (G, full)
    assert sv is not None  # a weight fit (no statistics) has every singular value
    total = float(np.sum(sv**2))
    tol = _lsq.EXACT_TOL * math.sqrt(total)
    r = max(1, min(r, int(np.max(np.sum(sv > tol, axis=-1)))))  # trimmed to the numerical rank
    err = math.sqrt(float(np.sum(sv[:, r:] ** 2)) / total) if total > 0 else 0.0
    f.first, f.second = f.first[:, :r], f.second[:, :, :r]  # the truncated SVD: the best rank-r weights
    new_bias = None  # the original bias tensor is kept unless calibration corrects it
    how = "SVD of the weights"
    st = _lsq.stats(rec, ctx) if params["fit"] == "data" else None
    if st is not None and err > _lsq.EXACT_TOL:
        rows = fit_rows(st, params)
        f = fit.low_rank_fit(wt.w, wt.b, r, st, second_taps=q, rows=rows)
        w_new = f.weight(kernel)
        new_bias = f.bias
        err = _lsq.rel_error(wt.w.reshape(1, -1), w_new.reshape(1, -1))
        how = (f"fitted on calibration patches ({f.method}, {_fit_note(st)}{_lsq.response_note(st, rows)}), "
               f"output error {fit.layer_error(wt.w, w_new, st):.3g}")

    names = Names(ctx, label(rec))
    geo = geometry(ctx, rec.node_id)
    first = f.first.reshape(g * r, c_in // g, *(kernel[:-1] + (1,) if form == "spatial" else kernel))
    second = f.second.reshape(c_out, r, *((1,) * (nd - 1) + (q,)))
    s1, s2 = ("v", "h") if form == "spatial" else ("reduce", "expand")
    g1, g2 = split_geometry(geo) if form == "spatial" else (geo, {})
    w1 = names.init(f"{s1}_W", wt.cast(first))
    w2 = names.init(f"{s2}_W", wt.cast(second))
    inits = [w1, w2]
    mid = names.tensor(s1)
    grp = {"group": g} if g > 1 else {}
    nodes = [names.node("Conv", [rec.input, w1.name], [mid], s1, kernel_shape=list(first.shape[2:]), **grp, **g1)]
    inputs2 = [mid, w2.name]
    if new_bias is not None:
        b_init = names.init(f"{s2}_B", wt.cast(new_bias))
        inits.append(b_init)
        inputs2.append(b_init.name)
    elif rec.bias:
        inputs2.append(rec.bias)
    nodes.append(names.node("Conv", inputs2, [rec.output], s2, kernel_shape=list(second.shape[2:]), **grp, **g2))
    macs, n_params, kind = _cost(rec, form, r)
    mid_channels = f"{g * r} intermediate channel" + ("s" if g * r > 1 else "")
    notes = f"{form} form, rank {r} of {full} per group ({mid_channels}); {how}" + (f"; {wt.notes}" if wt.notes else "")
    return Replacement(nodes, inits, err <= _lsq.EXACT_TOL, kind, macs, n_params, weight_error=err, notes=notes)


def _cost(rec: ConvRecord, form: str, r: int) -> tuple[int | None, int, str]:
    """(MACs, params, kind) after the rewrite at rank ``r`` per group."""
    c_in, c_out, g, kernel = rec.in_channels, rec.out_channels, rec.group, rec.kernel
    cig = c_in // g
    q = second_taps(rec, form)
    p = prod(kernel) // q
    mid = g * r
    n_out = out_elements(rec.output_shape)  # batch × output positions
    macs = None
    if n_out is not None:
        if form == "spatial":  # the vertical conv runs at the output height and the input width
            w_in, w_out = (rec.input_shape or (None,))[-1], (rec.output_shape or (None,))[-1]
            if isinstance(w_in, int) and w_out:
                macs = n_out // w_out * w_in * mid * cig * p + n_out * c_out * r * q
        else:
            macs = n_out * (mid * cig * p + c_out * r)
    n_params = mid * cig * p + c_out * r * q + bias_params(rec)
    k1 = tuple(kernel[:-1]) + (1,) if form == "spatial" else tuple(kernel)
    k2 = (1,) * (len(kernel) - 1) + (q,)
    kind = f"{classify(False, k1, g, c_in)}+{classify(False, k2, g, mid)}"
    return macs, n_params, kind


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return _cost(rec, form_of(rec, params["form"]), rank_of(rec, params))


RULE = Rule(
    name="low-rank",
    summary="conv → two convs through R channels shared by the whole layer: k_h×1 then 1×k_w (form=spatial, "
            "Jaderberg et al.) or k×k then 1×1 (form=channel), by SVD (exact at rank=full)",
    exact=exact_at_full_rank,
    params=(
        Param("rank", DEFAULT_RANK, "intermediate channels per group: an integer, 'full' (exact), or a share of "
              "the full rank such as 1/4", parse_rank),
        Param("form", "auto", "'spatial' (k_h×1 then 1×k_w, 2D), 'channel' (k×k then 1×1), or 'auto' (spatial "
              "for 2D kernels with both sides > 1)", _form),
        FIT_PARAM,
        response_param("post"),
    ),
    match=match,
    build=build,
    estimate=estimate,
    op_types=CONV,
)
