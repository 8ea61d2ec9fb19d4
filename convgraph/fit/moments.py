"""The moment algebra the fits share: damping, solves, per-channel and per-group views, bias correction, errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError

if TYPE_CHECKING:
    from .calibration import ConvStats


#: Default damping: this fraction of the mean diagonal is added to a covariance before it is inverted.
DAMP = 0.01


def damped(cov: np.ndarray, damp: float) -> np.ndarray:
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


def sqrt_pair(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ^{1/2} and Σ^{−1/2} of a stack of symmetric positive definite matrices."""
    lam, q = np.linalg.eigh(cov)
    lam = np.maximum(lam, lam[..., -1:] * 1e-12 + 1e-300)
    s = np.sqrt(lam)
    half = (q * s[..., None, :]) @ np.swapaxes(q, -1, -2)
    inv_half = (q / s[..., None, :]) @ np.swapaxes(q, -1, -2)
    return half, inv_half


def quad(a: np.ndarray, m: np.ndarray, b: np.ndarray) -> float:
    """Σ over the stack of tr(A M Bᵀ) (a BLAS matmul, not an einsum loop)."""
    return float(np.sum((a @ m) * b))


def per_channel(w: np.ndarray, group: int) -> np.ndarray:
    """(O, C/g, *k) → (C, Og, K): the slice of each input channel."""
    o, cg = w.shape[:2]
    og = o // group
    return w.reshape(group, og, cg, -1).transpose(0, 2, 1, 3).reshape(group * cg, og, -1)


def per_group(w: np.ndarray, group: int) -> np.ndarray:
    """(O, C/g, *k) → (G, Og, C/g·K), columns in (channel, tap) order like the full covariance."""
    o = w.shape[0]
    return w.reshape(group, o // group, -1)


def check_stats(w: np.ndarray, stats: ConvStats) -> None:
    c = w.shape[1] * stats.group
    if c != stats.channels or tuple(w.shape[2:]) != tuple(stats.kernel) or stats.count <= 0:
        raise ModelError(f"calibration statistics of {stats.node_id} (C={stats.channels}, kernel {stats.kernel}, "
                         f"{stats.count} patches) do not fit weights of shape {w.shape}")


def fit_group(w: np.ndarray, stats: ConvStats | None, group: int | None) -> int:
    """The group a fit of weights ``w`` works in: ``group``, else the statistics', else 1; the statistics
    checked against ``w`` and that group."""
    group = group or (1 if stats is None else stats.group)
    if stats is not None:
        check_stats(w, stats)
        if group != stats.group:
            raise ModelError(f"conv {stats.node_id}: group {group} given, the statistics have {stats.group}")
    return group


def corrected_bias(w: np.ndarray, w_new: np.ndarray, bias: np.ndarray | None, stats: ConvStats) -> np.ndarray:
    """b' = b + W μ_ref − W' μ: the new conv keeps the original's mean output on calibration data."""
    g = stats.group
    wg, ng = per_group(w.astype(np.float64), g), per_group(w_new.astype(np.float64), g)
    mr = stats.ref_mean.reshape(g, -1)
    m = stats.mean.reshape(g, -1)
    shift = (np.einsum("god,gd->go", wg, mr) - np.einsum("god,gd->go", ng, m)).reshape(-1)
    return (np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)) + shift


def channel_targets(wc: np.ndarray, stats: ConvStats, cov_damped: np.ndarray) -> np.ndarray:
    """Per-channel targets T_c = W_c C_c Σ_c⁻¹ (W_c itself without a reference)."""
    if stats.cross is None:
        return wc
    return solve(cov_damped, np.swapaxes(wc @ stats.cross_cov(), -1, -2)).swapaxes(-1, -2)


def holdout_score(w: np.ndarray, bias: np.ndarray | None, w_new: np.ndarray, b_new: np.ndarray,
                  held: ConvStats) -> float:
    """E‖(W x_ref + b) − (W' x + b')‖² on ``held`` up to a constant that does not depend on W', b'
    (the full covariance is needed); lower is better. Without a reference the constant is included,
    so the value is the mean squared output error itself."""
    g, n = held.group, max(held.count, 1)
    wg, ng = per_group(w.astype(np.float64), g), per_group(w_new.astype(np.float64), g)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    bg, nbg = b.reshape(g, -1), np.asarray(b_new, np.float64).reshape(g, -1)
    mu, mr = held.mean.reshape(g, -1), held.ref_mean.reshape(g, -1)
    sums = held.full_sums()
    full = sums / n
    fc = (held.full_cross if held.full_cross is not None else sums) / n
    nmu = np.einsum("god,gd->go", ng, mu)
    cross = (quad(wg, fc, ng) + np.sum(np.einsum("god,gd->go", wg, mr) * nbg)
             + np.sum(bg * nmu) + np.sum(bg * nbg))
    own = quad(ng, full, ng) + 2 * np.sum(nbg * nmu) + np.sum(nbg**2)
    score = own - 2 * cross
    if held.cross is None:  # no reference: add E‖W x + b‖² back
        wmu = np.einsum("god,gd->go", wg, mu)
        score += quad(wg, full, wg) + 2 * np.sum(bg * wmu) + np.sum(bg**2)
    return float(score)


def layer_error(w: np.ndarray, w_new: np.ndarray, stats: ConvStats) -> float:
    """Relative output error sqrt(E‖(W − W') x‖² / E‖W x‖²) on the calibration patches (centered, after
    bias correction); from the full covariance when kept, else ignoring cross-channel terms."""
    d = (w.astype(np.float64) - w_new.astype(np.float64))
    g = stats.group
    if stats.full is not None:
        sig = stats.full_cov()
        dg, wg = per_group(d, g), per_group(w.astype(np.float64), g)
        num = quad(dg, sig, dg)
        den = quad(wg, sig, wg)
    else:
        sig = stats.cov()
        dc, wc = per_channel(d, g), per_channel(w.astype(np.float64), g)
        num = quad(dc, sig, dc)
        den = quad(wc, sig, wc)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
