"""Helpers shared by the weight-rewriting rules: match checks, weights as float64, naming, new nodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from convgraph.fit.activation import row_weights
from convgraph.model.arithmetic import out_elements, prod  # noqa: F401  (out_elements: the rules import it from here)
from convgraph.model.record import ConvRecord
from convgraph.rule import Param, Rule, RuleContext, Skip
from convgraph.model.weights import constant_source
from convgraph.model.weights import elem_type as graph_elem_type

#: Where a weight may come from for a rule to rebuild it (ctx.value resolves all of these).
CONSTANT_SOURCES = ("initializer", "Constant", "ConstantOfShape", "DequantizeLinear")
#: Element types the rules rebuild weights for (computed in float64, cast back).
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.DOUBLE: "float64"}
#: Largest stride or dilated kernel extent (per axis) a rule plans for: the rules' plans and fitting matrices
#: grow with them (real models stay far below; a fuzzed 2^31 would never finish).
MAX_EXTENT = 4096
#: The op types of the rules that rewrite plain convolutions only (``Rule.op_types``, :func:`plain_conv_reason`).
CONV = ("Conv",)
#: Attributes of Conv/ConvTranspose that fix where the kernel is applied (carried over unchanged).
GEOMETRY_ATTRS = ("auto_pad", "pads", "strides", "dilations")


def plain_conv_reason(rec: ConvRecord, ctx: RuleContext, op_types: tuple[str, ...] = CONV) -> str | None:
    """None when ``rec`` is a float conv of one of ``op_types`` with constant weight (and bias), else why not
    (what does not depend on ``op_types`` is found once per conv and context: every rule asks)."""
    if rec.op_type in ("ConvInteger", "QLinearConv"):
        return ("quantized (ConvInteger/QLinearConv): its integer weights, scales and zero points would have to "
                "be requantized; rewrite the float model and quantize afterwards")
    if rec.op_type not in op_types or rec.domain not in ("", "ai.onnx"):
        dom = f"{rec.domain}." if rec.domain not in ("", "ai.onnx") else ""
        return f"{dom}{rec.op_type} is not {' or '.join(op_types)}"
    key = ("plain_conv", rec.graph, rec.node_id)
    memo = ctx.memo
    if key not in memo:
        memo[key] = _plain_conv_reason(rec, ctx)
    return memo[key]


def _plain_conv_reason(rec: ConvRecord, ctx: RuleContext) -> str | None:
    channels = [c for c in (rec.in_channels, rec.out_channels) if c is not None]
    if any(c < 1 or c % rec.group for c in channels):
        return f"group {rec.group} does not divide the channels {rec.in_channels}→{rec.out_channels}"
    extent = max([d * (k - 1) + 1 for k, d in zip(rec.kernel, rec.dilations)] + list(rec.strides), default=1)
    if extent > MAX_EXTENT:
        return (f"kernel {list(rec.kernel)}, dilations {list(rec.dilations)}, strides {list(rec.strides)}: "
                f"over {MAX_EXTENT} taps per axis, too large to rewrite")
    if rec.weight_source not in CONSTANT_SOURCES:
        return f"weight {rec.weight!r} is not a constant (it comes from {rec.weight_source})"
    if rec.bias and (rec.bias_source or constant_source(ctx.graph, rec.bias)) not in CONSTANT_SOURCES:
        return f"bias {rec.bias!r} is not a constant"
    return float_type_reason(ctx, rec.weight)


def channel_mixing_reason(rec: ConvRecord, ctx: RuleContext, depthwise: str) -> str | None:
    """As :func:`plain_conv_reason`, and the conv must mix input channels (``depthwise`` says why not)."""
    why = plain_conv_reason(rec, ctx)
    if why:
        return why
    if rec.in_channels // rec.group == 1:
        return depthwise
    return None


def elem_type(ctx: RuleContext, tensor: str) -> int | None:
    """The ONNX element type of ``tensor`` as shape inference (or the initializer) says, else its constant
    value's; None if unknown."""
    t = graph_elem_type(ctx.graph, tensor)
    if t is not None:
        return t
    value = ctx.value(tensor)
    return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)


def float_type_reason(ctx: RuleContext, tensor: str) -> str | None:
    t = elem_type(ctx, tensor)
    if t is None:
        return f"the element type of {tensor!r} is unknown"
    if t not in FLOAT_TYPES:
        return f"{tensor!r} is {helper.tensor_dtype_to_string(t).removeprefix('TensorProto.')}, not float16/32/64"
    return None


@dataclass
class Weights:
    """A conv's weight and bias as float64, and the element type to write them back in."""

    w: np.ndarray
    b: np.ndarray | None
    dtype: np.dtype
    notes: str = ""

    def cast(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.astype(self.dtype))


def weights(rec: ConvRecord, ctx: RuleContext) -> Weights:
    """The weight (and bias) of a conv that :func:`plain_conv_reason` accepted; :class:`Skip` when they hold
    NaN or Inf (no factorization or fit of them means anything)."""
    w = ctx.constant(rec.weight)
    b = ctx.constant(rec.bias) if rec.bias else None
    for what, v in (("weights", w), ("bias", b)):
        if v is not None and not np.isfinite(v).all():
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            raise Skip(f"{what} of node {label(rec)!r} are not finite ({bad} NaN/Inf values)")
    dtype = np.dtype(FLOAT_TYPES.get(helper.np_dtype_to_tensor_dtype(w.dtype), "float32"))
    notes = ""
    if rec.weight_source == "DequantizeLinear":
        notes = "weight dequantized into a float initializer (its QDQ quantization is not kept)"
    return Weights(w.astype(np.float64), None if b is None else b.astype(np.float64).reshape(-1), dtype, notes)


def attrs(ctx: RuleContext, node_id: str) -> dict:
    """The attributes of a node as Python values (strings decoded)."""
    out = dict(ctx.graph.graph.nodes[node_id]["attrs"])
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


def geometry(ctx: RuleContext, node_id: str) -> dict:
    """The attributes fixing where a conv's kernel is applied (auto_pad, pads, strides, dilations), as given."""
    a = attrs(ctx, node_id)
    return {k: a[k] for k in GEOMETRY_ATTRS if k in a and not (isinstance(a[k], list) and not a[k])}  # [] = default


def opset(ctx: RuleContext) -> int:
    """The model's ai.onnx opset version."""
    return next((o.version for o in ctx.graph.model.opset_import if o.domain in ("", "ai.onnx")), 1)


def unchanged(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    """The estimate of a rule that keeps the conv's MACs, parameters and kind (the ops around it change)."""
    return rec.macs, rec.params, rec.kind


def exact_prepass(name: str, summary: str, match, build, op_types: tuple[str, ...]) -> Rule:
    """The declaration of an exact pre-pass that keeps the conv's MACs, parameters and kind (it changes the ops
    around the conv: ``fuse-hardswish``, ``softmax-conv``, ``split-conv``)."""
    return Rule(name=name, summary=summary, exact=True, params=(), match=match, build=build, estimate=unchanged,
                prepass=True, saves_macs=False, op_types=op_types)


def label(rec: ConvRecord) -> str:
    """The readable base for new names: the node's name, else its id."""
    return rec.name or rec.node_id


class Names:
    """Fresh, readable names for the nodes and tensors replacing one conv: ``<conv>/dw``, ``<conv>/dw_W``."""

    def __init__(self, ctx: RuleContext, base: str):
        self.ctx, self.base = ctx, base

    def tensor(self, suffix: str) -> str:
        return self.ctx.name(f"{self.base}/{suffix}")

    def init(self, suffix: str, array: np.ndarray) -> onnx.TensorProto:
        return self.ctx.initializer(f"{self.base}/{suffix}", array)

    def node(self, op_type: str, inputs: list[str], outputs: list[str], suffix: str, **kwargs) -> onnx.NodeProto:
        """A node named ``<conv>/<suffix>`` (made unique among the graph's node ids)."""
        name = f"{self.base}/{suffix}"
        g, i = self.ctx.graph.graph, 1
        while name in g:
            name, i = f"{self.base}/{suffix}_{i}", i + 1
        return helper.make_node(op_type, inputs, outputs, name=name, **kwargs)


def bias_params(rec: ConvRecord) -> int:
    return rec.out_channels if rec.has_bias else 0


def kernel_estimate(rec: ConvRecord, kernel: tuple[int, ...]) -> tuple[int | None, int, str]:
    """(MACs, params, kind) of ``rec`` with a kernel of shape ``kernel`` instead (same channels, group and
    output): weights and MACs scale with the taps per filter, the bias stays."""
    k, k_new = prod(rec.kernel), prod(kernel)
    n_weights = (rec.params - bias_params(rec)) // k * k_new
    macs = None if rec.macs is None else rec.macs // k * k_new
    return macs, n_weights + bias_params(rec), rec.kind


def split_geometry(geo: dict) -> tuple[dict, dict]:
    """(vertical, horizontal) conv attributes: the height's strides/dilations/pads to one, the width's to the other.

    auto_pad splits as it is: SAME_* pads each axis by its own kernel and stride, and a 1-tap axis with
    stride 1 gets no pad, so both convs resolve exactly the original's pads.
    """
    v, h = {}, {}
    for key in ("strides", "dilations"):
        if key in geo:
            (sy, sx) = geo[key]
            v[key], h[key] = [sy, 1], [1, sx]
    if "pads" in geo:
        top, left, bottom, right = geo["pads"]
        v["pads"], h["pads"] = [top, 0, bottom, 0], [0, left, 0, right]
    if geo.get("auto_pad", "NOTSET") != "NOTSET":
        v["auto_pad"] = h["auto_pad"] = geo["auto_pad"]
    return v, h


def fit_mode(text: str) -> str:
    """Parse the rules' ``fit`` param: ``data`` or ``weights``."""
    if text not in ("data", "weights"):
        raise ValueError("must be 'data' or 'weights'")
    return text


#: The ``fit=weights|data`` parameter shared by the approximate rules.
FIT_PARAM = Param("fit", "data", "'data': fit on the calibration statistics when there are some (output error on "
                  "real activations, bias corrected); 'weights': fit the weights alone", fit_mode)


def response_mode(text: str) -> str:
    """Parse the ``response`` param: ``post`` or ``pre``."""
    if text not in ("post", "pre"):
        raise ValueError("must be 'post' or 'pre'")
    return text


def response_param(default: str) -> Param:
    """The ``response=post|pre`` parameter of the factorizing rules' data fits, with the rule's default (post
    where it measured better: README, "Fits to the response after the activation")."""
    return Param("response", default, "with fit=data: 'post' fits the output after the activation the conv feeds "
                 "(Relu, SiLU, HardSwish, ...: each output channel's error weighted by the activation's slope on "
                 "calibration data), 'pre' the conv's output itself", response_mode)


def fit_rows(stats, params: dict):
    """The output-channel weights of an activation-aware fit (``response=post`` and calibration statistics
    that measured an activation), else None."""
    if stats is None or params.get("response") != "post":
        return None
    return row_weights(stats)


def capped_rank(rank: "int | str", full: int) -> int:
    """A ``rank`` param (an int or ``"full"``) as the rank used: ``full`` for ``"full"``, else capped at it."""
    return full if rank == "full" else min(int(rank), full)


def exact_at_full_rank(params: dict) -> bool:
    """A factoring rule's ``exact``: the factors reproduce the kernel at ``rank=full`` only."""
    return params.get("rank") == "full"
