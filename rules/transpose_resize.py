"""Rule ``transpose-resize``: ConvTranspose → Resize (×stride, nearest or linear) + Conv (stride 1).

The resize-convolution of Odena et al. (Distill 2016): every output pixel gets the same kernel, so no
checkerboard. Both sides are linear in the input and, away from the borders, periodic with the stride,
so each is a ConvTranspose in disguise: the pair's effective (scatter) kernel is g'[δ] = Σ_j v[j]·r[δ − q + j]
(v the Conv kernel, q its begin pad, r the resize's interpolation weights: a box of s taps for
nearest, a triangle for linear), where the original's is g[δ] = w_dilated[δ + p_b]. The Conv kernel is
fitted by least squares so that g' matches g, weighted by the output error of a spatially correlated
input (``correlation`` ρ, see :mod:`._lsq`): output phase φ only sees taps ≡ φ (mod s). The begin pad q
is chosen (among the placements covering the original kernel) for the least error; the end pad follows
from the output size, and a negative pad becomes a Slice after the Conv, so the output shape is the
ConvTranspose's exactly (pads, output_padding, output_shape, auto_pad, dilations, groups).

``kernel=auto`` (default) is the smallest Conv whose effective kernel covers the ConvTranspose's
extent: d·(k−1)+1 − (taps of r) + 1, at least 1 (k=s=2 → 1×1; k=4, s=2 → 3×3 with pad 1, the classic
pair). Larger kernels fit better and cost more: MACs are (output pixels)·C_out·C_in/g·kernel^D, the
Resize not counted.

Exactness: with ``mode=nearest`` the pair is exactly Σ_i x[i]·g'[n − s·i] up to the borders, so it is
exact (reported per node) when g lies in the span, e.g. a ConvTranspose whose kernel is a box of s
taps convolved with something (all phase kernels equal for k = s). Linear resize clamps at the borders,
so it is never reported exact there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from convgraph.model.arithmetic import known, prod
from convgraph.errors import ModelError, UsageError
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Replacement, Rule, RuleContext, int_or

from . import _lsq
from ._common import Names, bias_params, label, opset, out_elements, plain_conv_reason, weights
from .dense import zero_fill

MODES = ("nearest", "linear")
#: The prior correlation ρ of neighbouring input pixels used for the fit.
DEFAULT_CORRELATION = 0.9
_INT64_MAX = np.iinfo(np.int64).max


#: The op types this rule rewrites.
OPS = ("ConvTranspose",)


def _mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return text


_kernel = int_or("auto")


def resize_taps(s: int, mode: str) -> tuple[int, np.ndarray]:
    """(first offset a, weights) of the resize's interpolation: u[m] = Σ_i x[i]·r[m − s·i], r over a, a+1, ...

    nearest (asymmetric, floor): u[m] = x[⌊m/s⌋], a box of s ones from 0. linear (half_pixel): input
    position (m + ½)/s − ½, so r[δ] = max(0, 1 − |(δ + ½)/s − ½|).
    """
    if mode == "nearest":
        return 0, np.ones(s)
    delta = np.arange(-s, 2 * s + 1)
    w = np.maximum(0.0, 1.0 - np.abs((delta + 0.5) / s - 0.5))
    nz = np.nonzero(w > 1e-12)[0]
    return int(delta[nz[0]]), w[nz[0]:nz[-1] + 1]


@dataclass(frozen=True)
class Axis:
    """One spatial axis of the rewrite: the ConvTranspose's geometry and the new Conv's kernel."""

    s: int
    extent: int  # d·(k−1)+1: taps of the dilated ConvTranspose kernel
    pb: int
    pe: int
    op: int
    kc: int  # Conv kernel
    a: int  # first offset of the resize weights
    r: tuple[float, ...]  # resize weights

    @property
    def b(self) -> int:
        return self.a + len(self.r) - 1

    def begin_pads(self) -> range:
        """Conv begin pads q worth trying: those whose effective kernel covers the original's taps
        (or lies inside them when the Conv is too small to cover)."""
        lo, hi = self.extent - 1 - self.pb - self.b, self.kc - 1 - self.a - self.pb
        return range(min(lo, hi), max(lo, hi) + 1)

    def end_pad(self, q: int) -> int:
        """The Conv end pad that gives the ConvTranspose's output size s·(i−1) + op + extent − p_b − p_e."""
        return self.kc - self.s + self.op + self.extent - 1 - self.pb - self.pe - q

    def system(self, q: int, rho: float) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(A, Ω, n, t0): over the δ window of n offsets, g' = A v; the target's taps start at index t0."""
        lo = min(-self.pb, q - self.kc + 1 + self.a)
        hi = max(self.extent - 1 - self.pb, q + self.b)
        n = hi - lo + 1
        a = np.zeros((n, self.kc))
        for j in range(self.kc):
            for i, w in enumerate(self.r):  # r index i is offset a + i = δ − q + j
                a[self.a + i + q - j - lo, j] = w
        return a, _lsq.markov(n, rho, self.s), n, -self.pb - lo


def axes(rec: ConvRecord, params: dict) -> "list[Axis] | str":
    """Per-axis plan for ``rec``, or why there is none."""
    nd = rec.spatial_dims
    if not all(known(p) for p in rec.pads):
        return f"auto_pad {rec.auto_pad}: the pads depend on the input size, which is unknown (give --input-shape)"
    op = rec.output_padding or (0,) * nd
    out = []
    for i in range(nd):
        s, k, d = rec.strides[i], rec.kernel[i], rec.dilations[i]
        a, r = resize_taps(s, params["mode"])
        extent = d * (k - 1) + 1
        kc = max(1, extent - len(r) + 1) if params["kernel"] == "auto" else int(params["kernel"])
        out.append(Axis(s, extent, int(rec.pads[i]), int(rec.pads[i + nd]), int(op[i]), kc, a, tuple(r.tolist())))
    return out


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    if opset(ctx) < 11:
        return f"opset {opset(ctx)}: Resize with coordinate_transformation_mode needs opset ≥ 11"
    plan = axes(rec, RULE.resolve_params(ctx.params))
    return plan if isinstance(plan, str) else None


def conv_target(w: np.ndarray, group: int, dilations: tuple[int, ...]) -> np.ndarray:
    """ConvTranspose weights (C_in, C_out/g, *k) as Conv-layout scatter kernels (C_out, C_in/g, *dilated k)."""
    c_in, og = w.shape[:2]
    cig = c_in // group
    t = w.reshape(group, cig, og, *w.shape[2:]).swapaxes(1, 2).reshape(group * og, cig, *w.shape[2:])
    return zero_fill(t, dilations)


def fit_kernel(target: np.ndarray, plan: list[Axis], rho: float) -> tuple[np.ndarray, tuple[int, ...], float, float]:
    """The Conv kernel (C_out, C_in/g, *kc) matching the scatter kernels ``target``; its begin pads, and the
    relative weight (Frobenius) and expected output (prior-weighted) errors of the effective kernel."""
    rows = target.shape[0] * target.shape[1]
    best = None
    for qs in itertools.product(*(ax.begin_pads() for ax in plan)):
        systems = [ax.system(q, rho) for ax, q in zip(plan, qs)]
        a = _lsq.kron([s[0] for s in systems])
        omega = _lsq.kron([s[1] for s in systems])
        width = [(0, 0), (0, 0)] + [(t0, n - t0 - ax.extent) for (_, _, n, t0), ax in zip(systems, plan)]
        g = np.pad(target, width).reshape(rows, -1)
        v = g @ _lsq.wls(a, omega).T
        fitted = v @ a.T
        out_err = _lsq.rel_error(g, fitted, omega)
        if best is None or out_err < best[3] - 1e-12:
            best = (v, qs, _lsq.rel_error(g, fitted), out_err)
    if best is None:
        raise ModelError("no placement of the kernel to fit")
    v, qs, w_err, out_err = best
    return v.reshape(*target.shape[:2], *(ax.kc for ax in plan)), qs, w_err, out_err


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    plan = axes(rec, params)
    if isinstance(plan, str):
        raise UsageError(f"rule transpose-resize on {label(rec)}: {plan}")
    wt = weights(rec, ctx)
    mode, nd, g = params["mode"], rec.spatial_dims, rec.group
    target = conv_target(wt.w, g, rec.dilations)
    v, qs, w_err, out_err = fit_kernel(target, plan, params["correlation"])
    ends = [ax.end_pad(q) for ax, q in zip(plan, qs)]

    names = Names(ctx, label(rec))
    nodes, inits = [], []
    x = rec.input
    upsample = any(ax.s > 1 for ax in plan)
    if upsample:
        scales = names.init("scales", np.array([1.0, 1.0] + [float(ax.s) for ax in plan], np.float32))
        inits.append(scales)
        roi = ""
        if opset(ctx) < 13:  # roi is a required input before opset 13
            roi_init = names.init("roi", np.zeros(0, np.float32))
            inits.append(roi_init)
            roi = roi_init.name
        how = ({"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"} if mode == "nearest"
               else {"coordinate_transformation_mode": "half_pixel"})
        x_up = names.tensor("resize")
        nodes.append(names.node("Resize", [x, roi, scales.name], [x_up], "resize", mode=mode, **how))
        x = x_up
    v_init = names.init("conv_W", wt.cast(v))
    inits.append(v_init)
    inputs = [x, v_init.name] + ([rec.bias] if rec.bias else [])
    crop = any(q < 0 for q in qs) or any(e < 0 for e in ends)
    y = names.tensor("conv") if crop else rec.output
    pads = [max(q, 0) for q in qs] + [max(e, 0) for e in ends]
    conv_attrs = {"group": g} if g > 1 else {}
    nodes.append(names.node("Conv", inputs, [y], "conv", kernel_shape=[ax.kc for ax in plan], pads=pads, **conv_attrs))
    if crop:
        cut = [i for i in range(nd) if qs[i] < 0 or ends[i] < 0]
        starts = names.init("crop_starts", np.array([max(-qs[i], 0) for i in cut], np.int64))
        stops = names.init("crop_ends", np.array([ends[i] if ends[i] < 0 else _INT64_MAX for i in cut], np.int64))
        ax_init = names.init("crop_axes", np.array([2 + i for i in cut], np.int64))
        inits += [starts, stops, ax_init]
        nodes.append(names.node("Slice", [y, starts.name, stops.name, ax_init.name], [rec.output], "crop"))

    exact = w_err <= _lsq.EXACT_TOL and (mode == "nearest" or not upsample)
    macs, n_params, kind = estimate(rec, params)
    size = "×".join(str(ax.kc) for ax in plan)
    notes = (f"{mode} resize ×{','.join(str(ax.s) for ax in plan)} + {size} conv; data-free fit (input correlation "
             f"{params['correlation']}), expected output error {out_err:.3g}")
    if mode == "linear" and upsample and w_err <= _lsq.EXACT_TOL:
        notes += "; exact away from the borders (linear resize clamps there)"
    if wt.notes:
        notes += f"; {wt.notes}"
    return Replacement(nodes, inits, exact, kind, macs, n_params, weight_error=w_err, notes=notes)


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    plan = axes(rec, params)
    kc = rec.kernel if isinstance(plan, str) else tuple(ax.kc for ax in plan)
    c_in, c_out, g = rec.in_channels, rec.out_channels, rec.group
    n = out_elements(rec.output_shape)
    macs = None if n is None else n * c_out * (c_in // g) * prod(kc)
    n_params = c_out * (c_in // g) * prod(kc) + bias_params(rec)
    conv_kind = "standard" if g == 1 else ("depthwise" if g == c_in else "grouped")
    return macs, n_params, f"resize+{conv_kind}"


RULE = Rule(
    name="transpose-resize",
    summary="ConvTranspose → Resize (nearest/linear, ×stride) + Conv, checkerboard-free; kernel by least squares",
    exact=False,
    params=(
        Param("mode", "nearest", "Resize mode: nearest (exact where the kernel allows) or linear", _mode),
        Param("kernel", "auto", "Conv kernel size per axis; 'auto': the smallest covering the ConvTranspose's extent",
              _kernel),
        Param("correlation", DEFAULT_CORRELATION, "data-free fit: correlation of neighbouring input pixels in [0, 1) "
              "(0 = plain least squares on the kernels)", _lsq.correlation),
    ),
    match=match,
    build=build,
    saves_macs=False,  # it is for checkerboard-free output, not speed
    estimate=estimate,
    op_types=OPS,
)
