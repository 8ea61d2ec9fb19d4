"""Rule ``dilated``: a dense k×k Conv → a smaller kernel k'×k' with dilation d over the same window.

Per spatial axis the new taps sit at ``offset + d·j`` (j < k') inside the original window of k taps,
with d·(k'−1)+1 ≤ k; the grid is centred (offset ⌊(k − span)/2⌋, moved where the pads do not allow it)
and the pads shrink by the offset at the start and by the rest at the end, so the output keeps its
size and alignment. Strides, group and bias are carried over; auto_pad becomes the explicit pads it
resolves to (onnxruntime takes no dilations with SAME_*), so those convs need a known input size.

The weights are a least-squares fit. Minimizing the kernel error ‖W − embed(W')‖ alone would just
sample W at the grid (every dropped tap lost, DC gain changed); instead the fit minimizes the expected
output error for a spatially correlated input (``correlation`` ρ between neighbouring pixels, see
:mod:`._lsq`), which moves the weight of a dropped tap onto the nearby grid taps; ``correlation=0`` is
the sampling fit. With calibration statistics the fit is weighted least squares on the real input
patches instead (:func:`convgraph.fit.subgrid_fit`, with bias correction). Exact when the kernel is
zero off the grid (e.g. a dilated conv made dense by the ``dense`` rule).

Defaults: every axis of at least 5 taps becomes 3 taps with the largest dilation that fits
(5 → 3 d=2, 7 → 3 d=3, 9 → 3 d=4): three taps is the smallest kernel that keeps a centre tap (the
output stays centred on the same pixel) and the largest dilation the fewest MACs. Axes of 1–4 taps
stay dense unless ``kernel`` or ``dilation`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convgraph import fit
from convgraph.model.arithmetic import known
from convgraph.errors import UsageError
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext, int_or

from . import _lsq
from ._common import CONV, FIT_PARAM, Names, attrs, kernel_estimate, label, plain_conv_reason, weights

#: Axes with at least this many taps shrink by default.
DEFAULT_MIN_TAPS = 5
#: The prior correlation ρ of neighbouring input pixels used without calibration data.
DEFAULT_CORRELATION = 0.9


_auto_or_int = int_or("auto")


@dataclass(frozen=True)
class Grid:
    """Where the new kernel sits in the old one, per axis, and the conv geometry that keeps the output."""

    kernel: tuple[int, ...]
    dilations: tuple[int, ...]
    offsets: tuple[int, ...]
    pads: tuple[int, ...]  # explicit ONNX pads (resolved from auto_pad)

    def taps(self, old_kernel: tuple[int, ...]) -> np.ndarray:
        """Flat indices (C order) into prod(old_kernel) of the new taps, in the new kernel's C order."""
        axes = [o + d * np.arange(k) for k, d, o in zip(self.kernel, self.dilations, self.offsets)]
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.ravel_multi_index([m.ravel() for m in mesh], old_kernel)


def _axis(k: int, kernel, dilation) -> "tuple[int, int] | str":
    """(k', d) for one axis of k taps, or why the params do not fit it."""
    if kernel == "auto" and dilation == "auto":
        return (3, (k - 1) // 2) if k >= DEFAULT_MIN_TAPS else (k, 1)
    if kernel == "auto":
        if dilation == 1 or k == 1:
            return k, 1
        if dilation >= k:
            return f"dilation {dilation} does not fit a kernel of {k} taps (at most {k - 1})"
        return (k - 1) // dilation + 1, dilation
    if kernel >= k and dilation in ("auto", 1):
        return k, 1
    if kernel < 2:
        return "kernel must be at least 2"
    d = (k - 1) // (kernel - 1) if dilation == "auto" else dilation
    if d * (kernel - 1) + 1 > k:
        return f"kernel {kernel} with dilation {d} spans {d * (kernel - 1) + 1} taps, more than the {k} it replaces"
    return kernel, d


def grid(rec: ConvRecord, params: dict) -> "Grid | str":
    """The new kernel, dilations, offsets and pads for ``rec``, or why there are none."""
    nd = rec.spatial_dims
    shape = []
    for k in rec.kernel:
        a = _axis(k, params["kernel"], params["dilation"])
        if isinstance(a, str):
            return a
        shape.append(a)
    if all(kk == k for (kk, _), k in zip(shape, rec.kernel)):
        size = "×".join(map(str, rec.kernel))
        return (f"nothing to shrink: kernel {size} (by default only axes of ≥ {DEFAULT_MIN_TAPS} taps shrink, to 3 "
                "taps; pass kernel= or dilation=)")
    kernel = tuple(kk for kk, _ in shape)
    dil = tuple(d for _, d in shape)
    slack = [k - (d * (kk - 1) + 1) for k, (kk, d) in zip(rec.kernel, shape)]
    if not all(known(p) for p in rec.pads):  # onnxruntime refuses dilation with SAME_*: explicit pads it is
        return (f"auto_pad {rec.auto_pad}: the pads depend on the input size, which is unknown (give --input-shape); "
                "onnxruntime does not take dilations with SAME_* auto_pad")
    pb, pe = rec.pads[:nd], rec.pads[nd:]
    offsets = []
    for i in range(nd):
        lo, hi = max(0, slack[i] - pe[i]), min(pb[i], slack[i])
        if lo > hi:
            return (f"the {kernel[i]}-tap grid (dilation {dil[i]}) leaves {slack[i]} taps of the {rec.kernel[i]}-tap "
                    f"window uncovered, more than the pads ({pb[i]}, {pe[i]}) can absorb")
        offsets.append(min(max(slack[i] // 2, lo), hi))
    pads = tuple(pb[i] - offsets[i] for i in range(nd)) + tuple(pe[i] - slack[i] + offsets[i] for i in range(nd))
    return Grid(kernel, dil, tuple(offsets), pads)


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = plain_conv_reason(rec, ctx)
    if why:
        return why
    if rec.dilated:
        return "already dilated (the `dense` rule makes it dense first)"
    g = grid(rec, RULE.resolve_params(ctx.params))
    return g if isinstance(g, str) else None


def prior_fit(w: np.ndarray, kernel: tuple[int, ...], taps: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights at ``taps`` minimizing the output error under the smooth-input prior; and that prior (K×K)."""
    omega = _lsq.kron([_lsq.markov(k, rho) for k in kernel])
    select = np.zeros((omega.shape[0], len(taps)))
    select[taps, np.arange(len(taps))] = 1.0
    m = _lsq.wls(select, omega)  # (S, K)
    o, cg = w.shape[:2]
    return (w.reshape(o * cg, -1) @ m.T).reshape(o, cg, len(taps)), omega


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    g = grid(rec, params)
    if isinstance(g, str):
        raise UsageError(f"rule dilated on {label(rec)}: {g}")
    wt = weights(rec, ctx)
    taps = g.taps(rec.kernel)
    o, cg = wt.w.shape[:2]
    flat = wt.w.reshape(o * cg, -1)
    on_grid = np.zeros_like(flat)
    on_grid[:, taps] = flat[:, taps]
    data = params["fit"] == "data" and _lsq.rel_error(flat, on_grid) > _lsq.EXACT_TOL  # on the grid: exact
    st = _lsq.stats(rec, ctx) if data else None
    bias: np.ndarray | None
    if st is not None:
        new, bias = fit.subgrid_fit(wt.w, wt.b, taps, st)
    else:
        new, omega = prior_fit(wt.w, rec.kernel, taps, params["correlation"])
        bias = wt.b
    embedded = np.zeros_like(flat)
    embedded[:, taps] = new.reshape(o * cg, -1)
    if st is not None:
        out_err = fit.layer_error(wt.w, embedded.reshape(wt.w.shape), st)
        how = f"fitted on calibration patches ({st.count} per channel), output error {out_err:.3g}"
    else:
        out_err = _lsq.rel_error(flat, embedded, omega)
        how = f"data-free fit (input correlation {params['correlation']}), expected output error {out_err:.3g}"
    w_err = _lsq.rel_error(flat, embedded)

    names = Names(ctx, label(rec))
    w_init = names.init("dilated_W", wt.cast(new.reshape(o, cg, *g.kernel)))
    inits = [w_init]
    inputs = [rec.input, w_init.name]
    if bias is not None and st is not None:
        b_init = names.init("dilated_B", wt.cast(bias))
        inits.append(b_init)
        inputs.append(b_init.name)
    elif bias is not None and rec.bias:  # the original bias, unchanged
        inputs.append(rec.bias)
    a = {k: v for k, v in attrs(ctx, rec.node_id).items() if k not in ("pads", "auto_pad", "dilations")}
    a.update(kernel_shape=list(g.kernel), dilations=list(g.dilations), pads=list(g.pads))
    node = names.node("Conv", inputs, [rec.output], "dilated", **a)
    macs, n_params, kind = estimate(rec, params)
    size = "×".join(map(str, g.kernel))
    notes = f"{size} dilation {','.join(map(str, g.dilations))}; {how}" + (f"; {wt.notes}" if wt.notes else "")
    exact = w_err <= _lsq.EXACT_TOL
    return Replacement([node], inits, exact, kind, macs, n_params, weight_error=w_err, notes=notes)


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    g = grid(rec, params)
    return kernel_estimate(rec, rec.kernel if isinstance(g, str) else g.kernel)


RULE = Rule(
    name="dilated",
    summary="dense k×k conv → smaller dilated kernel over the same window (5×5 → 3×3 d=2), least-squares fit",
    exact=False,
    params=(
        Param("kernel", "auto", "taps per axis of the new kernel (axes already that small stay dense); "
              "'auto': 3 for axes of ≥ 5 taps", _auto_or_int),
        Param("dilation", "auto", "dilation of the new kernel; 'auto': the largest that fits the window", _auto_or_int),
        FIT_PARAM,
        Param("correlation", DEFAULT_CORRELATION, "data-free fit: correlation of neighbouring input pixels in [0, 1) "
              "(0 = sample the kernel at the grid)", _lsq.correlation),
    ),
    match=match,
    build=build,
    estimate=estimate,
    op_types=CONV,
)
