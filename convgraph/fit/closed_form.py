"""Closed-form least-squares fits: kernels on a subset of taps (sub-grid), a conv reproducing a target tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError
from .moments import DAMP, check_stats, corrected_bias, damped, per_channel, per_group, solve

if TYPE_CHECKING:
    from .calibration import ConvStats

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
    check_stats(w, stats)
    g = stats.group
    og = o // g
    if stats.full is not None:
        sel = (np.arange(cg)[:, None] * k + taps[None, :]).reshape(-1)
        sig = damped(stats.full_cov()[:, sel][:, :, sel], damp)  # (G, S, S)
        cr = stats.full_cross_cov()[:, :, sel]  # (G, D, S)
        rhs = per_group(w64, g) @ cr  # (G, Og, S)
        new = solve(sig, np.swapaxes(rhs, -1, -2)).swapaxes(-1, -2).reshape(o, cg, len(taps))
    else:
        sig = damped(stats.cov()[:, taps][:, :, taps], damp)  # (C, S, S)
        cr = stats.cross_cov()[:, :, taps]  # (C, K, S)
        wc = per_channel(w64, g)  # (C, Og, K)
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
    sig = damped(stats.full_cov(), damp)  # (G, D, D)
    wg = solve(sig, tc).swapaxes(-1, -2)  # (G, Og, D)
    g, og, _ = wg.shape
    w = wg.reshape(g * og, stats.channels // g, *stats.kernel)
    b = stats.target_mean - np.einsum("god,gd->go", wg, stats.mean.reshape(g, -1)).reshape(-1)
    return w, b
