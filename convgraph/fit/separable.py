"""Per-input-channel rank-r factors (depthwise × pointwise): whitened SVD, then alternating least squares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .activation import scaled_rows
from .moments import (
    DAMP, channel_targets, corrected_bias, fit_group, damped, holdout_score, per_channel, per_group, solve,
    sqrt_pair,
)

if TYPE_CHECKING:
    from .calibration import ConvStats

#: Alternating least squares on the depthwise factors solves a (C/g·r·K)² system: only up to this size.
ALS_MAX = 2304


@dataclass
class SeparableFactors:
    """W'[g·Og + o, i] = pointwise[c] @ depthwise[c] for input channel c = g·Cg + i."""

    depthwise: np.ndarray  # (C, r, K): r filters (flattened taps) per input channel
    pointwise: np.ndarray  # (C, Og, r): each filter's weight in the outputs of the channel's group
    bias: np.ndarray  # (O,) corrected bias (zeros when the conv has none and the shift is zero)
    method: str  # "weights" | "exact" | "whitened" | "pointwise-ls" | "als"
    scores: dict = field(default_factory=dict)  # held-out score of each method tried (lower is better)

    def weight(self, kernel: tuple[int, ...], group: int) -> np.ndarray:
        """The effective kernel (O, C/g, *kernel)."""
        return _compose(self.depthwise, self.pointwise, kernel, group)


def _compose(dw: np.ndarray, pw: np.ndarray, kernel, group: int) -> np.ndarray:
    c, og = dw.shape[0], pw.shape[1]
    cg = c // group
    w = np.einsum("cor,crk->cok", pw, dw).reshape(group, cg, og, -1).transpose(0, 2, 1, 3)
    return w.reshape(group * og, cg, *kernel)


def separable_fit(w: np.ndarray, bias: np.ndarray | None, rank: int, stats: ConvStats | None, *,
                  group: int | None = None, damp: float = DAMP, als_iters: int = 4, als_max: int = ALS_MAX,
                  select: bool = True, rows: np.ndarray | None = None) -> SeparableFactors:
    """Rank-``rank`` depthwise × pointwise factors of conv weights ``w`` (O, C/g, *k) (``group``: the
    conv's, by default the statistics', else 1).

    Without ``stats``: the plain SVD of each input channel's slice (the weight fit). With them: the
    whitened SVD and, when the full patch covariance is known, alternating least squares (``als_iters``
    rounds; the pointwise step alone when the depthwise system is larger than ``als_max``), with the
    bias corrected for the mean shift. With ``select`` and held-out sums in ``stats``, each method is
    fitted on the rest and the one with the smallest held-out error is refitted on all the data (least
    squares over whole patches can overfit where a layer sees few positions). ``rows`` (O,) weights each
    output channel's error (an activation-aware fit, :mod:`convgraph.fit.activation`): the fit of the
    scaled rows D^{1/2}W, the pointwise factor scaled back.
    """
    if rows is not None and stats is not None:
        ws, bs = scaled_rows(np.asarray(w, np.float64), bias, rows)
        f = separable_fit(ws, bs, rank, stats, group=group, damp=damp, als_iters=als_iters, als_max=als_max,
                          select=select)
        g = group or stats.group
        sd = np.sqrt(np.asarray(rows, np.float64))
        c, og, r = f.pointwise.shape
        f.pointwise = (f.pointwise.reshape(g, c // g, og, r) / sd.reshape(g, 1, og, 1)).reshape(c, og, r)
        f.bias = f.bias / sd
        return f
    group = fit_group(w, stats, group)
    wc = per_channel(w.astype(np.float64), group)  # (C, Og, K)
    r = int(min(rank, wc.shape[1], wc.shape[2]))
    if stats is None or (r == min(wc.shape[1], wc.shape[2]) and stats.cross is None):  # exact at full rank
        u, s, vt = np.linalg.svd(wc, full_matrices=False)
        b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
        return SeparableFactors(vt[:, :r], u[:, :, :r] * s[:, None, :r], b, "weights" if stats is None else "exact")
    methods = {"whitened": 0}
    if stats.full is not None and als_iters > 0:
        methods.update({"pointwise-ls": 1, "als": als_iters})
    parts = stats.split() if select and len(methods) > 1 else None
    scores: dict[str, float] = {}
    if parts is not None:
        train, held = parts
        for name, iters in methods.items():
            f = _separable(w, wc, bias, r, train, damp, iters, als_max)
            scores[name] = holdout_score(w, bias, f.weight(stats.kernel, group), f.bias, held)
        best = min(scores, key=scores.__getitem__)
    else:
        best = "als" if "als" in methods else "whitened"
    f = _separable(w, wc, bias, r, stats, damp, methods[best], als_max)
    f.method, f.scores = best, scores
    return f


def _separable(w, wc, bias, r, stats: ConvStats, damp, iters, als_max) -> SeparableFactors:
    group = stats.group
    cov = damped(stats.cov(), damp)
    half, inv_half = sqrt_pair(cov)
    t = channel_targets(wc, stats, cov)
    u, s, vt = np.linalg.svd(t @ half, full_matrices=False)
    dw = vt[:, :r] @ inv_half  # (C, r, K)
    pw = u[:, :, :r] * s[:, None, :r]  # (C, Og, r)
    if iters > 0:
        dw, pw = _als(w, stats, dw, pw, damp, iters, als_max)
    w_new = _compose(dw, pw, stats.kernel, group)
    return SeparableFactors(dw, pw, corrected_bias(w, w_new, bias, stats), "als" if iters else "whitened")


def _als(w: np.ndarray, stats: ConvStats, dw: np.ndarray, pw: np.ndarray, damp: float, iters: int,
         als_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternate: pointwise given depthwise (least squares, cross-channel), depthwise given pointwise."""
    g = stats.group
    c, r, k = dw.shape
    cg, og = c // g, pw.shape[1]
    sig = damped(stats.full_cov(), damp)  # (G, D, D)
    cr = stats.full_cross_cov()  # (G, D, D): ref rows, candidate columns
    wg = per_group(w.astype(np.float64), g)  # (G, Og, D)
    wc_cross = wg @ cr  # (G, Og, D): E[(W x_ref) xᵀ]
    small = cg * r * k <= als_max
    for it in range(iters):
        # pointwise step: z = B x (block diagonal B), P = E[y zᵀ] E[z zᵀ]⁻¹
        bd = _block_diag(dw.reshape(g, cg, r, k))  # (G, Cg·r, D)
        zz = damped(bd @ sig @ np.swapaxes(bd, -1, -2), 1e-10)
        yz = wc_cross @ np.swapaxes(bd, -1, -2)  # (G, Og, Cg·r)
        p = solve(zz, np.swapaxes(yz, -1, -2)).swapaxes(-1, -2)  # (G, Og, Cg·r)
        pw = p.reshape(g, og, cg, r).transpose(0, 2, 1, 3).reshape(c, og, r)
        if not small or it == iters - 1:
            break  # the last step is the pointwise one: optimal for the depthwise filters it got
        # depthwise step: normal equations over all channels' filters at once
        a = p.reshape(g, og, cg, r)  # A[o, c, j]
        ata = np.einsum("gocj,godl->gcjdl", a, a)
        s4 = sig.reshape(g, cg, k, cg, k)
        h = np.einsum("gcjdl,gcmdn->gcjmdln", ata, s4).reshape(g, cg * r * k, cg * r * k)
        rhs = np.einsum("gocj,godk->gcjdk", a, wc_cross.reshape(g, og, cg, k))
        rhs = np.einsum("gcjck->gcjk", rhs).reshape(g, cg * r * k)
        h = 0.5 * (h + np.swapaxes(h, -1, -2))
        dh = np.einsum("gii->gi", h).mean(axis=-1)
        h = h + (1e-10 * dh)[:, None, None] * np.eye(h.shape[-1])
        dw = solve(h, rhs[..., None])[..., 0].reshape(c, r, k)
    return dw, pw


def _block_diag(b: np.ndarray) -> np.ndarray:
    """(G, Cg, r, K) per-channel filters → (G, Cg·r, Cg·K) block-diagonal maps."""
    g, cg, r, k = b.shape
    out = np.zeros((g, cg, r, cg, k))
    idx = np.arange(cg)
    out[:, idx, :, idx, :] = b.transpose(1, 0, 2, 3)
    return out.reshape(g, cg * r, cg * k)
