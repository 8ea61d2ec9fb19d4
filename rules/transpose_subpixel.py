"""Rule ``transpose-subpixel``: ConvTranspose → Conv + DepthToSpace (sub-pixel convolution), exact.

Per spatial dim (stride s, dilation d, kernel k, begin pad p): output o = s·Q + φ receives input q
through tap t exactly when s·q = o + p − d·t, i.e. only taps with d·t ≡ φ + p (mod s), reading
x[Q + m] with m = (φ + p − d·t)/s. So each phase φ is a stride-1 convolution of the input over the
offsets m; the offsets of all phases lie on one grid (step d′, their gcd), which becomes one Conv
with s^D·C_out output channels (channel c·s^D + φ, zero taps where a phase has none). The phases are
interleaved by DepthToSpace (CRD; 2D with equal strides) or Reshape/Transpose/Reshape, and a Slice
crops what the pads, output_padding or output_shape leave out. Pads follow onnxruntime (the ONNX
spec's formulas): see convgraph.model.arithmetic.conv_transpose_geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from convgraph.model.arithmetic import conv_transpose_geometry, known, prod
from convgraph.model.convops import classify
from convgraph.model.record import ConvRecord
from convgraph.rule import Replacement, Rule, RuleContext, Skip

from ._common import Names, attrs, bias_params, label, opset, out_elements, plain_conv_reason, weights

#: Most output phases (product of the strides) a sub-pixel conv is planned for: each is a stack of channels.
MAX_PHASES = 4096

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class DimPlan:
    """The sub-pixel form of one spatial dim."""

    stride: int
    taps: np.ndarray  # (s, K, k) 0/1: phase φ, conv tap j ← ConvTranspose tap t
    dilation: int  # of the new conv
    pad_begin: int
    pad_end: int
    crop_begin: int  # on the interleaved axis
    crop_end: int  # elements dropped at the end of the interleaved axis
    extra: int  # conv output length − input length (i-independent)

    @property
    def kernel(self) -> int:
        return self.taps.shape[1]


#: The op types this rule rewrites.
OPS = ("ConvTranspose",)


def plan_dim(k: int, s: int, d: int, p_begin: int, c: int) -> DimPlan:
    """Plan one dim whose ConvTranspose output length is O = s·i + c (c does not depend on i)."""
    offsets = {}  # (φ, t) → m
    for phi in range(s):
        for t in range(k):
            if (phi + p_begin - d * t) % s == 0:
                offsets[phi, t] = (phi + p_begin - d * t) // s
    ms = sorted(set(offsets.values()))
    lo = ms[0]
    step = math.gcd(*(m - lo for m in ms)) or 1
    n_taps = (ms[-1] - lo) // step + 1
    taps = np.zeros((s, n_taps, k))
    for (phi, t), m in offsets.items():
        taps[phi, (m - lo) // step, t] = 1.0
    pad_begin, shift = max(0, -lo), max(0, lo)
    span = step * (n_taps - 1)
    q_extra = -(-c // s)  # phases needed per input position beyond i: ceil(O/s) − i
    pad_end = max(0, shift + q_extra - pad_begin + span)
    extra = pad_begin + pad_end - span  # conv output length L = i + extra
    crop_begin = s * shift
    crop_end = s * extra - crop_begin - c
    return DimPlan(s, taps, step, pad_begin, pad_end, crop_begin, crop_end, extra)


@dataclass(frozen=True)
class Plan:
    dims: tuple[DimPlan, ...]
    in_spatial: tuple  # ints or None

    @property
    def phases(self) -> int:
        return prod(d.stride for d in self.dims)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(d.kernel for d in self.dims)

    def conv_spatial(self) -> tuple:
        return tuple(i + d.extra if known(i) else None for i, d in zip(self.in_spatial, self.dims))


def plan(rec: ConvRecord, ctx: RuleContext) -> "Plan | str":
    """The geometry of the rewrite, or why there is none."""
    if prod(rec.strides) > MAX_PHASES:  # planning takes stride × kernel steps per dim, the weight S× the channels
        return f"strides {list(rec.strides)} give over {MAX_PHASES} output phases"
    a = attrs(ctx, rec.node_id)
    nd = rec.spatial_dims
    in_shape = rec.input_shape if rec.input_shape and len(rec.input_shape) == nd + 2 else (None,) * (nd + 2)
    in_spatial = tuple(i if known(i) else None for i in in_shape[2:])
    output_shape = a.get("output_shape", ())
    if output_shape and not all(known(i) for i in in_spatial):
        return "output_shape is given and the input size is unknown (fix it with --input-shape)"
    # Without output_shape the pads do not depend on the input size: any size resolves them.
    sizes = tuple(i if known(i) else 1 for i in in_spatial)  # all known when output_shape is given
    adj = list(a.get("output_padding", ())) or [0] * nd
    pads, out = conv_transpose_geometry(sizes, rec.kernel, rec.strides, rec.dilations, a.get("pads", ()),
                                        rec.auto_pad, adj, output_shape)
    dims = tuple(plan_dim(k, s, d, pads[j], out[j] - s * i)
                 for j, (k, s, d, i) in enumerate(zip(rec.kernel, rec.strides, rec.dilations, sizes)))
    p = Plan(dims, in_spatial)
    if p.phases > 1 and opset(ctx) < 5:
        return f"model opset {opset(ctx)} < 5 (Reshape with a shape input)"
    return p


def _depth_to_space(p: Plan, version: int) -> bool:
    """Whether one DepthToSpace (CRD, opset 11) interleaves the phases: 2D with equal strides."""
    return version >= 11 and len(p.dims) == 2 and p.dims[0].stride == p.dims[1].stride


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    p = plan(rec, ctx)
    return p if isinstance(p, str) else None


def subpixel_weight(w: np.ndarray, group: int, dims: tuple[DimPlan, ...]) -> np.ndarray:
    """ConvTranspose weight (C_in, C_out/g, *k) → Conv weight (C_out·S, C_in/g, *K), channel c·S + φ."""
    c_in, cog = w.shape[:2]
    nd = len(dims)
    phi, tap, src = "abc"[:nd], "def"[:nd], "hij"[:nd]  # phase, new tap, old tap per dim
    expr = f"gxo{src}," + ",".join(f"{phi[j]}{tap[j]}{src[j]}" for j in range(nd)) + f"->go{phi}x{tap}"
    out = np.einsum(expr, w.reshape(group, c_in // group, cog, *w.shape[2:]), *(d.taps for d in dims))
    kernel = tuple(d.kernel for d in dims)
    return out.reshape(group * cog * prod(d.stride for d in dims), c_in // group, *kernel)


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    p = plan(rec, ctx)
    if isinstance(p, str):
        raise Skip(p)
    wt = weights(rec, ctx)
    names = Names(ctx, label(rec))
    dims, c_out = p.dims, rec.out_channels
    S = p.phases
    w_init = names.init("subpixel_W", wt.cast(subpixel_weight(wt.w, rec.group, dims)))
    inits = [w_init]
    conv_in = [rec.input, w_init.name]
    if wt.b is not None:
        b_init = names.init("subpixel_B", wt.cast(np.repeat(wt.b, S)))
        inits.append(b_init)
        conv_in.append(b_init.name)
    crop = any(d.crop_begin or d.crop_end for d in dims)
    y = rec.output if S == 1 and not crop else names.tensor("conv")
    conv_attrs: dict[str, Any] = {"kernel_shape": list(p.kernel), "pads": [d.pad_begin for d in dims] + [d.pad_end for d in dims],
                  "dilations": [d.dilation for d in dims]}
    if rec.group > 1:
        conv_attrs["group"] = rec.group
    nodes = [names.node("Conv", conv_in, [y], "conv", **conv_attrs)]
    version = opset(ctx)
    if S > 1:
        z = rec.output if not crop else names.tensor("interleave")
        if _depth_to_space(p, version):
            nodes.append(names.node("DepthToSpace", [y], [z], "d2s", blocksize=dims[0].stride, mode="CRD"))
        else:
            new_nodes, new_inits = _interleave(names, y, z, c_out, dims, p.conv_spatial(), version)
            nodes += new_nodes
            inits += new_inits
        y = z
    if crop:
        axes = [j for j, d in enumerate(dims) if d.crop_begin or d.crop_end]
        starts = [dims[j].crop_begin for j in axes]
        ends = [-dims[j].crop_end if dims[j].crop_end else INT64_MAX for j in axes]
        new_nodes, new_inits = _slice(names, y, rec.output, "crop", starts, ends, [j + 2 for j in axes], version)
        nodes += new_nodes
        inits += new_inits
    macs, n_params, kind = _estimate(rec, p)
    return Replacement(nodes, inits, True, kind, macs, n_params, weight_error=0.0, notes=wt.notes)


def _slice(names: Names, x: str, y: str, suffix: str, starts: list[int], ends: list[int], axes: list[int],
           version: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A Slice node: inputs from opset 10, attributes before."""
    if version < 10:
        return [names.node("Slice", [x], [y], suffix, starts=starts, ends=ends, axes=axes)], []
    inits = [names.init(f"{suffix}_{part}", np.array(v, np.int64))
             for part, v in (("starts", starts), ("ends", ends), ("axes", axes))]
    return [names.node("Slice", [x] + [t.name for t in inits], [y], suffix)], inits


def _interleave(names: Names, y: str, z: str, c_out: int, dims: tuple[DimPlan, ...], spatial: tuple, version: int
                ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """(N, C·S, L1..LD) with channel c·S + φ → (N, C, L1·s1, .., LD·sD) by Reshape/Transpose/Reshape."""
    nd = len(dims)
    strides = [d.stride for d in dims]
    perm = [0, 1] + [a for j in range(nd) for a in (2 + nd + j, 2 + j)]
    split, t = names.tensor("phases"), names.tensor("interleave_T")
    nodes, inits = [], []
    unknown = sum(1 for L in spatial if L is None)
    if unknown <= 1:  # constant shapes; 0 copies the batch, -1 stands for the one unknown length
        s1 = names.init("phases_shape", np.array([0, c_out, *strides, *(L if L is not None else -1 for L in spatial)],
                                                 np.int64))
        s2 = names.init("interleave_shape", np.array([0, c_out, *(L * s if L is not None else -1
                                                                  for L, s in zip(spatial, strides))], np.int64))
        inits += [s1, s2]
        shape1, shape2 = s1.name, s2.name
    else:  # several unknown lengths: shapes computed from the conv output's shape
        shape, sp = names.tensor("shape"), names.tensor("spatial")
        head1 = names.init("phases_head", np.array([0, c_out, *strides], np.int64))
        head2 = names.init("interleave_head", np.array([0, c_out], np.int64))
        sv = names.init("strides", np.array(strides, np.int64))
        inits += [head1, head2, sv]
        shape1, up, shape2 = names.tensor("phases_shape"), names.tensor("upsampled"), names.tensor("interleave_shape")
        cut, cut_inits = _slice(names, shape, sp, "spatial", [2], [2 + nd], [0], version)
        inits += cut_inits
        nodes += [names.node("Shape", [y], [shape], "shape"), *cut,
                  names.node("Concat", [head1.name, sp], [shape1], "phases_shape", axis=0),
                  names.node("Mul", [sp, sv.name], [up], "upsampled"),
                  names.node("Concat", [head2.name, up], [shape2], "interleave_shape", axis=0)]
    nodes += [names.node("Reshape", [y, shape1], [split], "phases"),
              names.node("Transpose", [split], [t], "interleave_T", perm=perm),
              names.node("Reshape", [t, shape2], [z], "interleave")]
    return nodes, inits


def _estimate(rec: ConvRecord, p: Plan) -> tuple[int | None, int, str]:
    cig = rec.in_channels // rec.group
    n_out = rec.out_channels * p.phases
    spatial = p.conv_spatial()
    batch = rec.input_shape[0] if rec.input_shape else None
    n = out_elements((batch, n_out, *spatial))
    macs = None if n is None else n * n_out * cig * prod(p.kernel)
    n_params = n_out * cig * prod(p.kernel) + bias_params(rec) * p.phases
    kind = classify(False, p.kernel, rec.group, rec.in_channels)
    return macs, n_params, kind + ("+depth_to_space" if p.phases > 1 else "")


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    """From the record alone: its resolved pads and shapes (pads of SAME_* do not depend on the input size)."""
    nd = rec.spatial_dims
    in_spatial = tuple(rec.input_shape[2:]) if rec.input_shape and len(rec.input_shape) == nd + 2 else (None,) * nd
    out_spatial = tuple(rec.output_shape[2:]) if rec.output_shape and len(rec.output_shape) == nd + 2 else (None,) * nd
    adj = list(rec.output_padding) or [0] * nd
    pads = rec.pads
    if not pads or any(v is None for v in pads):
        sizes = tuple(i if known(i) else 1 for i in in_spatial)
        pads, _ = conv_transpose_geometry(sizes, rec.kernel, rec.strides, rec.dilations, (), rec.auto_pad, adj)
    dims = []
    for j, (k, s, d, i, o) in enumerate(zip(rec.kernel, rec.strides, rec.dilations, in_spatial, out_spatial)):
        c = o - s * i if known(i) and known(o) else adj[j] + d * (k - 1) + 1 - s - pads[j] - pads[j + nd]
        dims.append(plan_dim(k, s, d, pads[j], c))
    return _estimate(rec, Plan(tuple(dims), tuple(i if known(i) else None for i in in_spatial)))


RULE = Rule(
    name="transpose-subpixel",
    summary="ConvTranspose → Conv + DepthToSpace (sub-pixel convolution), exact for any stride, pads and groups",
    exact=True,
    params=(),
    match=match,
    build=build,
    estimate=estimate,
    op_types=OPS,
)
