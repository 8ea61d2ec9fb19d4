"""Which graph nodes are convolutions, and what kind of convolution each is.

The bottom of the analysis: the analyzer, the receptive-field pass, shape propagation, the profiler and the
rules all ask these, so they sit below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvOp:
    """Where a conv op keeps its weight and bias, and how it lays out its data."""

    weight: int
    bias: int | None
    transposed: bool = False
    quantized: bool = False
    channels_last: bool = False


#: (domain, op_type) → ConvOp for every convolution op convgraph knows.
CONV_OPS: dict[tuple[str, str], ConvOp] = {
    ("", "Conv"): ConvOp(1, 2),
    ("", "ConvTranspose"): ConvOp(1, 2, transposed=True),
    ("", "ConvInteger"): ConvOp(1, None, quantized=True),
    ("", "QLinearConv"): ConvOp(3, 8, quantized=True),
    ("com.microsoft", "FusedConv"): ConvOp(1, 2),
    ("com.microsoft", "NhwcConv"): ConvOp(1, 2, channels_last=True),
    ("com.microsoft", "NhwcFusedConv"): ConvOp(1, 2, channels_last=True),
    ("com.microsoft", "QLinearConv"): ConvOp(3, 8, quantized=True),
}


#: The op types of :data:`CONV_OPS`: one set lookup rules out every other node.
_CONV_TYPES = frozenset(op for _, op in CONV_OPS)


def conv_op(data: dict) -> ConvOp | None:
    """The :class:`ConvOp` of a graph node's data, or None when it is not a convolution."""
    if data.get("kind") != "op" or data["op_type"] not in _CONV_TYPES:
        return None
    domain = "" if data["domain"] in ("", "ai.onnx") else data["domain"]
    return CONV_OPS.get((domain, data["op_type"]))


def classify(transposed: bool, kernel: tuple[int, ...], group: int, in_channels: int | None) -> str:
    """The conv's kind (one of :data:`~convgraph.model.record.KINDS`)."""
    if transposed:
        return "transposed"
    one = all(k == 1 for k in kernel)
    if group == 1:
        return "pointwise" if one else "standard"
    if in_channels is not None and group == in_channels:
        return "depthwise"
    return "pointwise_grouped" if one else "grouped"
