"""Data-aware fits: replacement weights that minimize a conv's output error on calibration activations.

A rewrite replaces a conv ``y = W x + b`` (``x`` an input patch) by a constrained ``y' = W' x' + b'``.
Weight fits minimize ‖W − W'‖; what matters is E‖(W x_ref + b) − (W' x + b')‖² over the activations the
model really sees (``x_ref`` the original model's patches, ``x`` the patches of the model being rewritten:
the same unless earlier layers were rewritten, see :mod:`convgraph.calibrate`). With centered moments
Σ = Cov(x) and C = Cov(x_ref, x), the optimal bias is ``b' = b + W μ_ref − W' μ`` (bias correction) and
the weights minimize tr(W' Σ W'ᵀ) − 2 tr(W C W'ᵀ), i.e. ‖(T − W') Σ^{1/2}‖² with the target
T = W C Σ⁻¹ (T = W without a reference). Fits here:

* :func:`separable_fit` — per input channel, rank-r factors (depthwise × pointwise): whitened SVD
  (W'_c = U_r S_r V_rᵀ Σ_c^{−1/2} from the SVD of T_c Σ_c^{1/2}, the optimum when channels are
  uncorrelated), then, where the full patch covariance was kept, alternating least squares over the
  pointwise and depthwise factors with the cross-channel terms.
* :func:`subgrid_fit` — kernels restricted to a subset of taps (``dilated``: dense k×k onto a dilated
  grid): weighted least squares, closed form.
* :func:`target_fit` — a conv fitted so that it reproduces a target tensor from its own input (the last
  conv of a replacement, e.g. ``transpose-resize``): least squares on the calibration moments.
* :func:`low_rank_fit` — two convs through R channels shared by the whole layer (``low-rank``): reduced-rank
  regression in closed form (k×k then 1×1), alternating least squares from a Kronecker-whitened SVD (k_h×1
  then 1×k_w).

Covariances are damped by ``damp`` × their mean diagonal (GPTQ's 1% rule) before inversion, so taps
the calibration data never excites do not get unbounded weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:  # the statistics are calibrate's; the fits only read them
    from .calibrate import ConvStats

#: Default damping: this fraction of the mean diagonal is added to a covariance before it is inverted.
DAMP = 0.01
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


def _damped(cov: np.ndarray, damp: float) -> np.ndarray:
    """cov + damp·mean(diag)·I for a stack of square matrices (identity where a channel is dead)."""
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    d = np.einsum("...ii->...i", cov).mean(axis=-1)
    dead = ~(d > 0)
    eye = np.eye(cov.shape[-1])
    out = cov + (damp * np.where(dead, 1.0, d))[..., None, None] * eye
    if dead.any():
        out[dead] = eye
    return out


def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.linalg.solve(a, b)`` for a stack of square ``a``; where a matrix is singular (a channel the
    calibration data never excites, a factor that came out zero) the least-norm least-squares solution
    (pseudo-inverse) instead of an error."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ b


def _sqrt_pair(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ^{1/2} and Σ^{−1/2} of a stack of symmetric positive definite matrices."""
    lam, q = np.linalg.eigh(cov)
    lam = np.maximum(lam, lam[..., -1:] * 1e-12 + 1e-300)
    s = np.sqrt(lam)
    half = (q * s[..., None, :]) @ np.swapaxes(q, -1, -2)
    inv_half = (q / s[..., None, :]) @ np.swapaxes(q, -1, -2)
    return half, inv_half


def _quad(a: np.ndarray, m: np.ndarray, b: np.ndarray) -> float:
    """Σ over the stack of tr(A M Bᵀ) (a BLAS matmul, not an einsum loop)."""
    return float(np.sum((a @ m) * b))


def _per_channel(w: np.ndarray, group: int) -> np.ndarray:
    """(O, C/g, *k) → (C, Og, K): the slice of each input channel."""
    o, cg = w.shape[:2]
    og = o // group
    return w.reshape(group, og, cg, -1).transpose(0, 2, 1, 3).reshape(group * cg, og, -1)


def _per_group(w: np.ndarray, group: int) -> np.ndarray:
    """(O, C/g, *k) → (G, Og, C/g·K), columns in (channel, tap) order like the full covariance."""
    o = w.shape[0]
    return w.reshape(group, o // group, -1)


def _check(w: np.ndarray, stats: ConvStats) -> None:
    c = w.shape[1] * stats.group
    if c != stats.channels or tuple(w.shape[2:]) != tuple(stats.kernel) or stats.count <= 0:
        raise ModelError(f"calibration statistics of {stats.node_id} (C={stats.channels}, kernel {stats.kernel}, "
                         f"{stats.count} patches) do not fit weights of shape {w.shape}")


def corrected_bias(w: np.ndarray, w_new: np.ndarray, bias: np.ndarray | None, stats: ConvStats) -> np.ndarray:
    """b' = b + W μ_ref − W' μ: the new conv keeps the original's mean output on calibration data."""
    g = stats.group
    wg, ng = _per_group(w.astype(np.float64), g), _per_group(w_new.astype(np.float64), g)
    mr = stats.ref_mean.reshape(g, -1)
    m = stats.mean.reshape(g, -1)
    shift = (np.einsum("god,gd->go", wg, mr) - np.einsum("god,gd->go", ng, m)).reshape(-1)
    return (np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)) + shift


def _targets(wc: np.ndarray, stats: ConvStats, cov_damped: np.ndarray) -> np.ndarray:
    """Per-channel targets T_c = W_c C_c Σ_c⁻¹ (W_c itself without a reference)."""
    if stats.cross is None:
        return wc
    return solve(cov_damped, np.swapaxes(wc @ stats.cross_cov(), -1, -2)).swapaxes(-1, -2)


def separable_fit(w: np.ndarray, bias: np.ndarray | None, rank: int, stats: ConvStats | None, *,
                  group: int | None = None, damp: float = DAMP, als_iters: int = 4, als_max: int = ALS_MAX,
                  select: bool = True) -> SeparableFactors:
    """Rank-``rank`` depthwise × pointwise factors of conv weights ``w`` (O, C/g, *k) (``group``: the
    conv's, by default the statistics', else 1).

    Without ``stats``: the plain SVD of each input channel's slice (the weight fit). With them: the
    whitened SVD and, when the full patch covariance is known, alternating least squares (``als_iters``
    rounds; the pointwise step alone when the depthwise system is larger than ``als_max``), with the
    bias corrected for the mean shift. With ``select`` and held-out sums in ``stats``, each method is
    fitted on the rest and the one with the smallest held-out error is refitted on all the data (least
    squares over whole patches can overfit where a layer sees few positions).
    """
    group = group or (1 if stats is None else stats.group)
    if stats is not None:
        _check(w, stats)
        if group != stats.group:
            raise ModelError(f"conv {stats.node_id}: group {group} given, the statistics have {stats.group}")
    wc = _per_channel(w.astype(np.float64), group)  # (C, Og, K)
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
        best = min(scores, key=scores.get)
    else:
        best = "als" if "als" in methods else "whitened"
    f = _separable(w, wc, bias, r, stats, damp, methods[best], als_max)
    f.method, f.scores = best, scores
    return f


def _separable(w, wc, bias, r, stats: ConvStats, damp, iters, als_max) -> SeparableFactors:
    group = stats.group
    cov = _damped(stats.cov(), damp)
    half, inv_half = _sqrt_pair(cov)
    t = _targets(wc, stats, cov)
    u, s, vt = np.linalg.svd(t @ half, full_matrices=False)
    dw = vt[:, :r] @ inv_half  # (C, r, K)
    pw = u[:, :, :r] * s[:, None, :r]  # (C, Og, r)
    if iters > 0:
        dw, pw = _als(w, stats, dw, pw, damp, iters, als_max)
    w_new = _compose(dw, pw, stats.kernel, group)
    return SeparableFactors(dw, pw, corrected_bias(w, w_new, bias, stats), "als" if iters else "whitened")


def holdout_score(w: np.ndarray, bias: np.ndarray | None, w_new: np.ndarray, b_new: np.ndarray,
                  held: ConvStats) -> float:
    """E‖(W x_ref + b) − (W' x + b')‖² on ``held`` up to a constant that does not depend on W', b'
    (the full covariance is needed); lower is better. Without a reference the constant is included,
    so the value is the mean squared output error itself."""
    g, n = held.group, max(held.count, 1)
    wg, ng = _per_group(w.astype(np.float64), g), _per_group(w_new.astype(np.float64), g)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    bg, nbg = b.reshape(g, -1), np.asarray(b_new, np.float64).reshape(g, -1)
    mu, mr = held.mean.reshape(g, -1), held.ref_mean.reshape(g, -1)
    full = held.full / n
    fc = (held.full_cross if held.full_cross is not None else held.full) / n
    nmu = np.einsum("god,gd->go", ng, mu)
    cross = (_quad(wg, fc, ng) + np.sum(np.einsum("god,gd->go", wg, mr) * nbg)
             + np.sum(bg * nmu) + np.sum(bg * nbg))
    own = _quad(ng, full, ng) + 2 * np.sum(nbg * nmu) + np.sum(nbg**2)
    score = own - 2 * cross
    if held.cross is None:  # no reference: add E‖W x + b‖² back
        wmu = np.einsum("god,gd->go", wg, mu)
        score += _quad(wg, full, wg) + 2 * np.sum(bg * wmu) + np.sum(bg**2)
    return float(score)


def _als(w: np.ndarray, stats: ConvStats, dw: np.ndarray, pw: np.ndarray, damp: float, iters: int,
         als_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternate: pointwise given depthwise (least squares, cross-channel), depthwise given pointwise."""
    g = stats.group
    c, r, k = dw.shape
    cg, og = c // g, pw.shape[1]
    sig = _damped(stats.full_cov(), damp)  # (G, D, D)
    cr = stats.full_cross_cov()  # (G, D, D): ref rows, candidate columns
    wg = _per_group(w.astype(np.float64), g)  # (G, Og, D)
    wc_cross = wg @ cr  # (G, Og, D): E[(W x_ref) xᵀ]
    small = cg * r * k <= als_max
    for it in range(iters):
        # pointwise step: z = B x (block diagonal B), P = E[y zᵀ] E[z zᵀ]⁻¹
        bd = _block_diag(dw.reshape(g, cg, r, k))  # (G, Cg·r, D)
        zz = _damped(bd @ sig @ np.swapaxes(bd, -1, -2), 1e-10)
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


def subgrid_fit(w: np.ndarray, bias: np.ndarray | None, taps: np.ndarray, stats: ConvStats | None, *,
                damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Weights on a subset of kernel taps (flat indices ``taps`` into prod(kernel)) that best reproduce ``w``.

    Returns (O, C/g, len(taps)) weights and the corrected bias. Without ``stats``: the weights at
    those taps (least squares in the weights); with them: weighted least squares on the patch moments,
    over whole group patches when the full covariance was kept, else per channel.
    """
    taps = np.asarray(taps, dtype=np.int64)
    o, cg = w.shape[:2]
    k = int(np.prod(w.shape[2:]))
    w64 = w.astype(np.float64).reshape(o, cg, k)
    if stats is None:
        b = np.zeros(o) if bias is None else bias.astype(np.float64)
        return w64[:, :, taps], b
    _check(w, stats)
    g = stats.group
    og = o // g
    if stats.full is not None:
        sel = (np.arange(cg)[:, None] * k + taps[None, :]).reshape(-1)
        sig = _damped(stats.full_cov()[:, sel][:, :, sel], damp)  # (G, S, S)
        cr = stats.full_cross_cov()[:, :, sel]  # (G, D, S)
        rhs = _per_group(w64, g) @ cr  # (G, Og, S)
        new = solve(sig, np.swapaxes(rhs, -1, -2)).swapaxes(-1, -2).reshape(o, cg, len(taps))
    else:
        sig = _damped(stats.cov()[:, taps][:, :, taps], damp)  # (C, S, S)
        cr = stats.cross_cov()[:, :, taps]  # (C, K, S)
        wc = _per_channel(w64, g)  # (C, Og, K)
        rhs = wc @ cr  # (C, Og, S)
        nc = solve(sig, np.swapaxes(rhs, -1, -2)).swapaxes(-1, -2)  # (C, Og, S)
        new = nc.reshape(g, cg, og, -1).transpose(0, 2, 1, 3).reshape(o, cg, len(taps))
    full_new = np.zeros_like(w64)
    full_new[:, :, taps] = new
    return new, corrected_bias(w64.reshape(w.shape), full_new.reshape(w.shape), bias, stats)


def target_fit(stats: ConvStats, *, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Weights (O, C/g, *k) and bias of the conv that best reproduces ``stats.target`` from its input.

    Needs statistics gathered with a target (``calibrate(..., targets=...)``).
    """
    tc = stats.target_cov()
    if tc is None or stats.full is None:
        raise ModelError(f"conv {stats.node_id}: no target statistics (calibrate with targets=...)")
    sig = _damped(stats.full_cov(), damp)  # (G, D, D)
    wg = solve(sig, tc).swapaxes(-1, -2)  # (G, Og, D)
    g, og, _ = wg.shape
    w = wg.reshape(g * og, stats.channels // g, *stats.kernel)
    b = stats.target_mean - np.einsum("god,gd->go", wg, stats.mean.reshape(g, -1)).reshape(-1)
    return w, b


def layer_error(w: np.ndarray, w_new: np.ndarray, stats: ConvStats) -> float:
    """Relative output error sqrt(E‖(W − W') x‖² / E‖W x‖²) on the calibration patches (centered, after
    bias correction); from the full covariance when kept, else ignoring cross-channel terms."""
    d = (w.astype(np.float64) - w_new.astype(np.float64))
    g = stats.group
    if stats.full is not None:
        sig = stats.full_cov()
        dg, wg = _per_group(d, g), _per_group(w.astype(np.float64), g)
        num = _quad(dg, sig, dg)
        den = _quad(wg, sig, wg)
    else:
        sig = stats.cov()
        dc, wc = _per_channel(d, g), _per_channel(w.astype(np.float64), g)
        num = _quad(dc, sig, dc)
        den = _quad(wc, sig, wc)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


# ---- whole-layer low rank (rule low-rank) ----------------------------------------------------------------
#: Alternating least-squares sweeps of the low-rank fit with a kernel split (the spatial form).
LOW_RANK_ALS_ITERS = 6
#: Preconditioned conjugate-gradient steps per solve of the first factor inside a sweep.
LOW_RANK_CG_ITERS = 12


@dataclass
class LowRankFactors:
    """A conv factored through R intermediate channels per group.

    The kernel's taps split as (p, q), q the last ``Q`` of them in C order; W'[g·Og + o, c, p, q] =
    Σ_r first[g, r, c, p] · second[g, o, r, q]: a conv over the p taps (C/g → R per group) followed by
    one over the q taps (R → O/g per group). Q = 1 is the channel form (k×k conv, then 1×1); p the rows
    and q the columns of a 2D kernel the spatial form (k_h×1, then 1×k_w: Jaderberg et al.'s scheme 2).
    """

    first: np.ndarray  # (G, R, C/g, P)
    second: np.ndarray  # (G, O/g, R, Q)
    bias: np.ndarray  # (O,)
    method: str  # "weights" | "exact" | "whitened" | "channel-whitened" | "als"
    scores: dict = field(default_factory=dict)  # held-out score of each method tried (lower is better)
    singular: np.ndarray | None = None  # weight fits: every singular value per group (G, min dims)

    def weight(self, kernel: tuple[int, ...]) -> np.ndarray:
        """The effective kernel (O, C/g, *kernel)."""
        g, _, cg, _ = self.first.shape
        og = self.second.shape[1]
        return np.einsum("grcp,gorq->gocpq", self.first, self.second, optimize=True).reshape(g * og, cg, *kernel)

    @property
    def rank(self) -> int:
        return self.first.shape[1]


class _Metric:
    """A second-moment matrix over a group's whole patch (D = C/g·K taps in (channel, tap) order): dense
    (G, D, D), or block-diagonal with one (K, K) block per channel (C, K, K), the approximation used where
    the whole-patch covariance was not kept (channels uncorrelated)."""

    def __init__(self, mats: np.ndarray, group: int, blocks: bool):
        self.mats, self.group, self.blocks = mats, group, blocks

    def _b(self, x: np.ndarray) -> np.ndarray:  # (G, m, D) → (G, m, Cg, K)
        k = self.mats.shape[-1]
        return x.reshape(x.shape[0], x.shape[1], -1, k)

    def mul(self, x: np.ndarray) -> np.ndarray:
        """x M for x (G, m, D)."""
        if not self.blocks:
            return x @ self.mats
        m = self.mats.reshape(self.group, -1, *self.mats.shape[1:])
        return np.einsum("gmck,gckl->gmcl", self._b(x), m, optimize=True).reshape(x.shape)

    def solve(self, x: np.ndarray) -> np.ndarray:
        """x M⁻¹ for x (G, m, D) and a symmetric M."""
        if not self.blocks:
            return solve(self.mats, np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
        m = self.mats.reshape(self.group, 1, -1, *self.mats.shape[1:])  # (G, 1, Cg, K, K)
        return solve(m, self._b(x)[..., None])[..., 0].reshape(x.shape)

    def kron(self, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
        """Factors of Σ ≈ Σ_v ⊗ Σ_h over taps split (c, p) × q: partial traces, Σ_v (G, Cg·P, Cg·P) and
        Σ_h (G, Q, Q) (their scale is immaterial)."""
        g = self.group
        if not self.blocks:
            a = self.mats.reshape(g, -1, q, self.mats.shape[-1] // q, q)
            return np.einsum("gaqbq->gab", a) / q, np.einsum("gaqat->gqt", a) / a.shape[1]
        a = self.mats.reshape(g, -1, p, q, p, q)  # (G, Cg, P, Q, P, Q)
        cg = a.shape[1]
        sv = np.zeros((g, cg, p, cg, p))
        idx = np.arange(cg)
        sv[:, idx, :, idx, :] = (np.einsum("gcpqsq->gcps", a) / q).transpose(1, 0, 2, 3)
        return sv.reshape(g, cg * p, cg * p), np.einsum("gcpqpt->gqt", a) / (cg * p)


def _low_rank_metrics(stats: ConvStats, damp: float, blocks: bool) -> tuple[_Metric, _Metric]:
    """(Σ damped, C = E[x_ref xᵀ]) as metrics: whole-patch where kept and not ``blocks``, else per channel."""
    if stats.full is not None and not blocks:
        return (_Metric(_damped(stats.full_cov(), damp), stats.group, False),
                _Metric(stats.full_cross_cov(), stats.group, False))
    return _Metric(_damped(stats.cov(), damp), stats.group, True), _Metric(stats.cross_cov(), stats.group, True)


def _lr_split(w: np.ndarray, group: int, q: int) -> np.ndarray:
    """(O, C/g, *k) → (G, Og, Cg, P, Q)."""
    o, cg = w.shape[:2]
    return w.reshape(group, o // group, cg, -1, q)


def _lr_weights(w: np.ndarray, group: int, q: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of each group's M[(c, p), (o, q)] = W[o, c, p, q] (Eckart–Young): first, second and
    every singular value (G, min dims); each factor carries √σ."""
    wv = _lr_split(w, group, q)
    g, og, cg, p, _ = wv.shape
    u, s, vt = np.linalg.svd(wv.transpose(0, 2, 3, 1, 4).reshape(g, cg * p, og * q), full_matrices=False)
    root = np.sqrt(s[:, :rank])
    first = (u[:, :, :rank] * root[:, None, :]).transpose(0, 2, 1).reshape(g, rank, cg, p)
    second = (vt[:, :rank] * root[:, :, None]).reshape(g, rank, og, q).transpose(0, 2, 1, 3)
    return first, second, s


def _lr_whitened(t: np.ndarray, sig: _Metric, shape: tuple[int, ...], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` fit of target ``t`` (G, Og, D) in the Kronecker approximation Σ ≈ Σ_v ⊗ Σ_h of the
    metric: the SVD of Σ_v^{1/2} M_T (I ⊗ Σ_h^{1/2}), mapped back. Exact (reduced-rank regression,
    ‖(T − W')Σ^{1/2}‖ minimal) when Q = 1 and the metric is whole-patch."""
    g, og, cg, p, q = shape
    sv, sh = sig.kron(p, q)
    hv, ihv = _sqrt_pair(sv)
    hh, ihh = _sqrt_pair(sh)
    m = (t.reshape(g, og, cg * p, q) @ hh[:, None]).transpose(0, 2, 1, 3).reshape(g, cg * p, og * q)
    u, s, vt = np.linalg.svd(hv @ m, full_matrices=False)
    root = np.sqrt(s[:, :rank])
    first = (ihv @ (u[:, :, :rank] * root[:, None, :])).transpose(0, 2, 1).reshape(g, rank, cg, p)
    second = (vt[:, :rank] * root[:, :, None]).reshape(g, rank, og, q) @ ihh[:, None]
    return first, second.transpose(0, 2, 1, 3)


def _lr_second(first: np.ndarray, wc: np.ndarray, sig: _Metric, q: int) -> np.ndarray:
    """The least-squares second factor (G, Og, R, Q) for a given first one: E[y zᵀ] E[z zᵀ]⁻¹ with z the
    first conv's outputs at the Q positions the second conv reads."""
    g, r, cg, p = first.shape
    e = np.einsum("grcp,qs->grqcps", first, np.eye(q)).reshape(g, r * q, cg * p * q)
    zz = _damped(e @ np.swapaxes(sig.mul(e), -1, -2), 1e-10)
    yz = wc @ np.swapaxes(e, -1, -2)  # (G, Og, R·Q)
    sec = solve(zz, np.swapaxes(yz, -1, -2)).swapaxes(-1, -2)
    return sec.reshape(g, -1, r, q)


def _lr_first(first: np.ndarray, second: np.ndarray, wc: np.ndarray, sig: _Metric, prec: tuple, iters: int
              ) -> np.ndarray:
    """The first factor given the second, by conjugate gradients on the normal equations (warm start; a
    Kronecker preconditioner (BᵀΣ_hB)⁻¹ ⊗ Σ_v⁻¹): each step lowers the objective."""
    g, r, cg, p = first.shape
    og, q = second.shape[1], second.shape[3]
    sh, isv = prec
    gk = _damped(np.einsum("gorq,gqs,gots->grt", second, sh, second), 1e-8)

    s2 = second.transpose(0, 1, 3, 2).reshape(g, og * q, r)  # rows (o, q)
    s2t = np.swapaxes(s2, -1, -2)

    def contract(y: np.ndarray) -> np.ndarray:  # (G, Og, D) → Σ_{o,q} B[o, r, q] y[o, (c, p), q]
        return s2t @ y.reshape(g, og, cg * p, q).transpose(0, 1, 3, 2).reshape(g, og * q, cg * p)

    bm = second.reshape(g, og, r * q)
    gram = (np.swapaxes(bm, -1, -2) @ bm).reshape(g, r, q, r * q)  # Σ_o B[o, r, q] B[o, r', q']

    def op(a: np.ndarray) -> np.ndarray:  # a (G, R, Cg·P) → H a, through Σ once per output or per (r, q)
        if og <= r * q:
            wa = (s2 @ a).reshape(g, og, q, cg * p).transpose(0, 1, 3, 2).reshape(g, og, -1)
            return contract(sig.mul(wa))
        z = sig.mul(np.einsum("grc,qs->grqcs", a, np.eye(q)).reshape(g, r * q, -1))  # (a_r ⊗ e_q) Σ
        return np.einsum("grqb,gbcq->grc", gram, z.reshape(g, r * q, cg * p, q), optimize=True)

    def precond(res: np.ndarray) -> np.ndarray:
        return solve(gk, res) @ isv

    b = contract(wc)
    x = first.reshape(g, r, cg * p)
    res = b - op(x)
    z = precond(res)
    d = z
    rz = float(np.sum(res * z))
    for _ in range(iters):
        hd = op(d)
        dhd = float(np.sum(d * hd))
        if not dhd > 0 or rz <= 0:
            break
        alpha = rz / dhd
        x = x + alpha * d
        res = res - alpha * hd
        z = precond(res)
        rz, rz_old = float(np.sum(res * z)), rz
        d = z + (rz / rz_old) * d
    return x.reshape(g, r, cg, p)


def _low_rank(w: np.ndarray, bias, rank: int, q: int, stats: ConvStats, damp: float, iters: int,
              blocks: bool, cg_iters: int = LOW_RANK_CG_ITERS) -> LowRankFactors:
    """One data-aware low-rank fit on ``stats``: the Kronecker-whitened SVD, then ``iters`` ALS sweeps."""
    g = stats.group
    sig, cross = _low_rank_metrics(stats, damp, blocks)
    wv = _lr_split(w, g, q)
    shape = wv.shape
    wg = wv.reshape(g, shape[1], -1)
    wc = cross.mul(wg)  # E[(W x_ref) xᵀ] (G, Og, D)
    t = wg if stats.cross is None else sig.solve(wc)  # the target T = W C Σ⁻¹
    first, second = _lr_whitened(t, sig, shape, rank)
    if iters > 0:
        sv, sh = sig.kron(shape[3], q)
        prec = (sh, solve(sv, np.broadcast_to(np.eye(sv.shape[-1]), sv.shape)))
        for _ in range(iters):
            second = _lr_second(first, wc, sig, q)
            first = _lr_first(first, second, wc, sig, prec, cg_iters)
        second = _lr_second(first, wc, sig, q)
    first, second = _balance(first, second)
    f = LowRankFactors(first, second, np.zeros(0), "als" if iters else ("channel-whitened" if sig.blocks else
                                                                         "whitened"))
    f.bias = corrected_bias(w, f.weight(stats.kernel), bias, stats)
    return f


def _balance(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each intermediate channel so that its filters in both factors have the same norm (the
    product is unchanged; keeps fp16 weights in range)."""
    a = np.sqrt(np.einsum("grcp->gr", first**2))
    b = np.sqrt(np.einsum("gorq->gr", second**2))
    s = np.sqrt(np.where((a > 0) & (b > 0), b / np.where(a > 0, a, 1), 1.0))
    return first * s[:, :, None, None], second / s[:, None, :, None]


def low_rank_fit(w: np.ndarray, bias: np.ndarray | None, rank: int, stats: ConvStats | None, *, second_taps: int = 1,
                 group: int | None = None, damp: float = DAMP, als_iters: int = LOW_RANK_ALS_ITERS,
                 select: bool = True) -> LowRankFactors:
    """Rank-``rank`` (per group) factors of conv weights ``w`` (O, C/g, *k) through R intermediate channels,
    the kernel's last ``second_taps`` taps (C order) going to the second conv (1: the channel form; k_w of a
    2D kernel: the spatial form). See :class:`LowRankFactors`.

    Without ``stats``: the truncated SVD of each group's M[(c, p), (o, q)] (the best rank-R weights). With
    them (bias corrected for the mean shift): in the metric of the whole-patch covariance Σ where it was
    kept, else of the per-channel covariances (block-diagonal Σ: channels taken as uncorrelated),
    * ``whitened``: the SVD of Σ_v^{1/2} M_T (I ⊗ Σ_h^{1/2}) for the Kronecker approximation Σ ≈ Σ_v ⊗ Σ_h
      over the (c, p) and q taps — for the channel form (Q = 1) exactly the optimum W' = [TΣ^{1/2}]_R Σ^{−1/2}
      (reduced-rank regression, T the target of the module doc);
    * ``als`` (Q > 1): ``als_iters`` alternating least-squares sweeps from it in the exact metric (second
      factor in closed form, first by preconditioned conjugate gradients);
    * ``channel-whitened`` (channel form, whole-patch Σ kept): the closed form in the block-diagonal
      metric, which cannot overfit the cross-channel terms of a layer that saw few positions.
    With ``select`` and held-out sums in ``stats`` (whole-patch Σ kept), each method is fitted on the rest
    and the one with the smallest held-out output error refitted on all the data.
    """
    group = group or (1 if stats is None else stats.group)
    if stats is not None:
        _check(w, stats)
        if group != stats.group:
            raise ModelError(f"conv {stats.node_id}: group {group} given, the statistics have {stats.group}")
    w = w.astype(np.float64)
    k = int(np.prod(w.shape[2:]))
    q = int(second_taps)
    if q < 1 or k % q:
        raise ModelError(f"a kernel of {k} taps does not split into {q} second-conv taps")
    og, cg = w.shape[0] // group, w.shape[1]
    full = min(cg * (k // q), og * q)
    r = int(min(rank, full))
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    if stats is None or (r == full and stats.cross is None):  # the weight fit (exact at full rank)
        first, second, s = _lr_weights(w, group, q, r)
        first, second = _balance(first, second)
        return LowRankFactors(first, second, b, "weights" if stats is None else "exact", singular=s)
    blocks = stats.full is None
    methods = {"channel-whitened": (0, True)} if blocks else {"whitened": (0, False)}
    if q == 1 and not blocks:
        methods["channel-whitened"] = (0, True)
    if q > 1 and als_iters > 0:
        methods = {"als": (als_iters, True)} if blocks else {**methods, "als": (als_iters, False)}
    parts = stats.split() if select and len(methods) > 1 else None
    scores: dict[str, float] = {}
    if parts is not None:
        train, held = parts
        for name, (iters, blocks) in methods.items():
            f = _low_rank(w, bias, r, q, train, damp, iters, blocks)
            scores[name] = holdout_score(w, bias, f.weight(stats.kernel), f.bias, held)
        best = min(scores, key=scores.get)
    else:
        best = "als" if "als" in methods else next(iter(methods))
    iters, blocks = methods[best]
    f = _low_rank(w, bias, r, q, stats, damp, iters, blocks)
    f.method, f.scores = best, scores
    return f
