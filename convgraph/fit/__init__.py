"""Data-aware fits: replacement weights that minimize a conv's output error on calibration activations.

A rewrite replaces a conv ``y = W x + b`` (``x`` an input patch) by a constrained ``y' = W' x' + b'``.
Weight fits minimize ‖W − W'‖; what matters is E‖(W x_ref + b) − (W' x + b')‖² over the activations the
model really sees (``x_ref`` the original model's patches, ``x`` the patches of the model being rewritten:
the same unless earlier layers were rewritten, see :mod:`convgraph.engine.calibrate`). With centered moments
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

Post-activation fits: where a conv feeds an activation, the low-rank and separable fits (and the
``spatial-separable`` rule's) can weight each output channel's error by the activation's slope measured on
calibration data, a first-order fit of the response after the activation (:mod:`.activation`).

Modules: ``moments`` (the algebra all fits share), ``separable``, ``closed_form`` (sub-grid and target fits),
``low_rank``, ``activation`` (the activation a conv feeds, the channel weights); the names the rules use
are re-exported here (``from convgraph import fit``; ``fit.separable_fit``).
"""

from .activation import Activation, activation_of, row_weights, scaled_rows
from .closed_form import subgrid_fit, target_fit
from .low_rank import LOW_RANK_ALS_ITERS, LOW_RANK_CG_ITERS, LowRankFactors, low_rank_fit
from .moments import DAMP, corrected_bias, damped, holdout_score, layer_error, per_channel, per_group, solve
from .separable import ALS_MAX, SeparableFactors, separable_fit

__all__ = [
    "ALS_MAX", "Activation", "DAMP", "LOW_RANK_ALS_ITERS", "LOW_RANK_CG_ITERS", "LowRankFactors", "SeparableFactors",
    "activation_of", "corrected_bias", "damped", "holdout_score", "layer_error", "low_rank_fit", "per_channel",
    "per_group", "row_weights", "scaled_rows", "separable_fit", "solve", "subgrid_fit", "target_fit",
]
