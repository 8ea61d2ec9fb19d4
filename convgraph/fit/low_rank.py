"""Whole-layer low rank: two convs through R channels shared by the layer (reduced-rank regression, ALS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError
from .activation import scaled_rows
from .moments import DAMP, corrected_bias, fit_group, damped, holdout_score, solve, sqrt_pair

if TYPE_CHECKING:
    from .calibration import ConvStats

#: Alternating least-squares sweeps of the low-rank fit with a kernel split (the spatial form), and
#: preconditioned conjugate-gradient steps per solve of the first factor inside a sweep. On YOLOv8n's 234
#: low-rank candidates (held-out layer error, calibration on 24 images) 2 sweeps of 6 steps gave the same
#: median error as 6 of 12 (90th percentile of the ratio 1.017) in half the time (31.5 s against 61.6 s).
LOW_RANK_ALS_ITERS = 2
LOW_RANK_CG_ITERS = 6


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
        return (_Metric(damped(stats.full_cov(), damp), stats.group, False),
                _Metric(stats.full_cross_cov(), stats.group, False))
    return _Metric(damped(stats.cov(), damp), stats.group, True), _Metric(stats.cross_cov(), stats.group, True)


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
    hv, ihv = sqrt_pair(sv)
    hh, ihh = sqrt_pair(sh)
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
    zz = damped(e @ np.swapaxes(sig.mul(e), -1, -2), 1e-10)
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
    gk = damped(np.einsum("gorq,gqs,gots->grt", second, sh, second), 1e-8)

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
                 select: bool = True, rows: np.ndarray | None = None) -> LowRankFactors:
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
    and the one with the smallest held-out output error refitted on all the data. ``rows`` (O,) weights
    each output channel's error (an activation-aware fit, :mod:`convgraph.fit.activation`): the fit of
    the scaled rows D^{1/2}W, the second factor scaled back.
    """
    if rows is not None and stats is not None:
        ws, bs = scaled_rows(np.asarray(w, np.float64), bias, rows)
        f = low_rank_fit(ws, bs, rank, stats, second_taps=second_taps, group=group, damp=damp, als_iters=als_iters,
                         select=select)
        g = f.first.shape[0]
        sd = np.sqrt(np.asarray(rows, np.float64))
        f.first, f.second = _balance(f.first, f.second / sd.reshape(g, -1, 1, 1))
        f.bias = f.bias / sd
        return f
    group = fit_group(w, stats, group)
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
        best = min(scores, key=scores.__getitem__)
    else:
        best = "als" if "als" in methods else next(iter(methods))
    iters, blocks = methods[best]
    f = _low_rank(w, bias, r, q, stats, damp, iters, blocks)
    f.method, f.scores = best, scores
    return f
