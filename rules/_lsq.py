"""Data-free least-squares kernel fits for the approximate rules: a smooth-input prior instead of data.

Plain least squares on the kernels (‖W − W'‖) treats the conv input as white noise: a tap that the new
kernel cannot hold is simply dropped. Real inputs (images, feature maps) are spatially correlated, so a
dropped tap is better moved to its neighbours. The rules here minimize the expected output error
E‖(W − W') * x‖² for a stationary input whose correlation between pixels Δ apart (per axis) is
``ρ^|Δ|`` (the separable first-order Markov model of image statistics; ρ = 0 gives white noise, i.e.
the plain kernel fit). Output position o of a layer whose effective kernel acts with stride s on the
input (a ConvTranspose scatters with stride s: output phase φ only meets taps t ≡ φ mod s) sees taps t
and t' with correlation ρ^{|t−t'|/s} when t ≡ t' (mod s), else not at all; the prior matrix Ω below is
that correlation over a kernel's taps, and the fit for target kernels g is v = (AᵀΩA)⁻¹AᵀΩ g for a
new kernel v whose effective kernel is A v. Channels are treated as uncorrelated.

Calibration statistics (``convgraph calibrate``), where the engine passes them, replace the prior
(see :func:`stats`).
"""

from __future__ import annotations

from functools import reduce
from typing import Sequence

import numpy as np

from convgraph.model.record import ConvRecord
from convgraph.rule import RuleContext, Skip

#: A relative weight residual at or below this counts as exact (float64 fit of float32 weights).
EXACT_TOL = 1e-6


def correlation(text: str) -> float:
    """Parse the ``correlation`` param: ρ in [0, 1)."""
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise ValueError("must be in [0, 1)")
    return v


def markov(n: int, rho: float, step: int = 1) -> np.ndarray:
    """(n, n) prior over n taps of one axis: ρ^{|i−j|/step} where i ≡ j (mod step), else 0."""
    d = np.subtract.outer(np.arange(n), np.arange(n))
    same = d % step == 0
    return np.where(same, float(rho) ** (np.abs(d) // step), 0.0)


def kron(mats: Sequence[np.ndarray]) -> np.ndarray:
    """Kronecker product of per-axis matrices (C order over the axes: the last axis varies fastest)."""
    return reduce(np.kron, mats, np.ones((1, 1)))


def wls(a: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """M such that v = M g minimizes (A v − g)ᵀ Ω (A v − g) (Ω symmetric positive definite)."""
    lt = np.linalg.cholesky(omega).T  # Ω = L Lᵀ: the objective is ‖Lᵀ(A v − g)‖²
    return np.linalg.pinv(lt @ a) @ lt


def rel_error(target: np.ndarray, approx: np.ndarray, omega: np.ndarray | None = None) -> float:
    """sqrt(Σ dᵀΩd / Σ gᵀΩg) over the rows of (rows, taps) arrays; Ω = I when None (Frobenius)."""
    d = target - approx
    if omega is None:
        num, den = float(np.sum(d * d)), float(np.sum(target * target))
    else:
        num, den = float(np.einsum("ri,ij,rj->", d, omega, d)), float(np.einsum("ri,ij,rj->", target, omega, target))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def stats(rec: ConvRecord, ctx: RuleContext):
    """The calibration statistics of ``rec``'s input patches when the engine was given some, else None;
    :class:`Skip` when they are not finite (NaN/Inf activations: nothing can be fitted on them)."""
    for_conv = getattr(ctx.calibration, "for_conv", None)
    st = for_conv(rec) if for_conv is not None else None
    if st is not None and not _finite(st):
        raise Skip(f"calibration activations at node {rec.name or rec.node_id!r} are not finite (NaN/Inf upstream)")
    return st


def response_note(st, rows) -> str:
    """``, <activation> response`` for a note when a fit weighted its rows by the activation, else ``""``."""
    return f", {st.activation} response" if rows is not None else ""


def _finite(st) -> bool:
    """Whether every sum held by calibration statistics ``st`` (a ConvStats) is finite."""
    return all(np.isfinite(v).all() for v in vars(st).values() if isinstance(v, np.ndarray))
