#!/usr/bin/env python
"""Write the small deterministic sample ONNX models that convgraph's tests and demos use.

Usage: ``python models/make_models.py [--out DIR] [NAME ...]`` (default: every model, into
the folder this script lives in). Every model uses opset 17 of the default domain and IR
version 8, has readable unique node names, input ``x`` and output ``y`` (``logits`` for
``sample.onnx``), and is byte-identical from run to run (each model has its own fixed seed).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "convgraph-make_models"

Shape = Sequence[int | str]


class Builder:
    """Collects nodes and initializers of one graph, with a private seeded RNG."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.rng = np.random.default_rng(zlib.crc32(model_name.encode()))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- primitives -----------------------------------------------------------------
    def _unique(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r} in {self.model_name}")
        self._names.add(name)
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), self._unique(name)))
        return name

    def node(
        self, op: str, name: str, inputs: Sequence[str], out: str | None = None, *, n_out: int = 1, **attrs: Any
    ) -> str:
        """Add node ``name``; its (first) output is ``out`` or ``<name>_out``; return that output."""
        outs = [out or f"{name}_out"] + [f"{name}_out{i}" for i in range(1, n_out)]
        node = helper.make_node(op, list(inputs), [self._unique(o) for o in outs], name=self._unique(name), **attrs)
        self.nodes.append(node)
        return outs[0]

    # -- random tensors -----------------------------------------------------------------
    def he(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        """He-normal weights: N(0, 2 / fan_in)."""
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def small(self, shape: Sequence[int], scale: float = 0.1) -> np.ndarray:
        """N(0, scale^2) values (biases, BN shifts)."""
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def uniform(self, shape: Sequence[int], lo: float, hi: float) -> np.ndarray:
        """U(lo, hi) values (BN scales and variances)."""
        return self.rng.uniform(lo, hi, shape).astype(np.float32)

    # -- layers ---------------------------------------------------------------------------
    def conv_weight(self, cin: int, cout: int, k: Sequence[int], group: int = 1) -> np.ndarray:
        """He-normal Conv weight ``[cout, cin/group, *k]``."""
        return self.he((cout, cin // group, *k), (cin // group) * int(np.prod(k)))

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int | Sequence[int] = 3,
        *,
        ndim: int = 2,
        stride: int = 1,
        dilation: int = 1,
        group: int = 1,
        pads: Sequence[int] | None = None,
        auto_pad: str | None = None,
        bias: bool = True,
        out: str | None = None,
    ) -> str:
        """Conv with He-normal weights; default pads keep the size (``d*(k-1)/2`` per side)."""
        ks = [k] * ndim if isinstance(k, int) else list(k)
        attrs: dict[str, Any] = {
            "kernel_shape": ks,
            "strides": [stride] * len(ks),
            "dilations": [dilation] * len(ks),
            "group": group,
        }
        if auto_pad is not None:
            attrs["auto_pad"] = auto_pad
        else:
            p = list(pads) if pads is not None else [dilation * (kk - 1) // 2 for kk in ks] * 2
            attrs["pads"] = p
        inputs = [x, self.init(f"{name}/W", self.conv_weight(cin, cout, ks, group))]
        if bias:
            inputs.append(self.init(f"{name}/B", self.small((cout,))))
        return self.node("Conv", name, inputs, out, **attrs)

    def conv_transpose(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int,
        *,
        stride: int,
        pads: Sequence[int] = (0, 0, 0, 0),
        output_padding: Sequence[int] | None = None,
        group: int = 1,
        bias: bool = True,
        out: str | None = None,
    ) -> str:
        """ConvTranspose (weight layout ``[C_in, C_out/group, k, k]``)."""
        # Each output pixel receives about cin/group * k*k / stride**2 contributions.
        fan = max(1, (cin // group) * k * k // (stride * stride))
        w = self.he((cin, cout // group, k, k), fan)
        attrs: dict[str, Any] = {
            "kernel_shape": [k, k],
            "strides": [stride, stride],
            "pads": list(pads),
            "group": group,
        }
        if output_padding is not None:
            attrs["output_padding"] = list(output_padding)
        inputs = [x, self.init(f"{name}/W", w)]
        if bias:
            inputs.append(self.init(f"{name}/B", self.small((cout,))))
        return self.node("ConvTranspose", name, inputs, out, **attrs)

    def bn(self, name: str, x: str, c: int, out: str | None = None) -> str:
        """BatchNormalization (inference) with non-trivial scale, bias, mean and variance."""
        inputs = [
            x,
            self.init(f"{name}/scale", self.uniform((c,), 0.5, 1.5)),
            self.init(f"{name}/bias", self.small((c,))),
            self.init(f"{name}/mean", self.small((c,))),
            self.init(f"{name}/var", self.uniform((c,), 0.5, 1.5)),
        ]
        return self.node("BatchNormalization", name, inputs, out, epsilon=1e-5)

    def relu(self, name: str, x: str, out: str | None = None) -> str:
        """Relu node."""
        return self.node("Relu", name, [x], out)

    # -- finishing ----------------------------------------------------------------------
    def model(
        self,
        inputs: Sequence[tuple[str, int, Shape]],
        outputs: Sequence[tuple[str, int, Shape | None]],
        doc: str,
    ) -> onnx.ModelProto:
        """Build the model; output shapes given as ``None`` come from shape inference."""
        graph = helper.make_graph(
            self.nodes,
            self.model_name,
            [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, t, None if s is None else list(s)) for n, t, s in outputs],
            self.inits,
            doc_string=doc,
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version="1",
            doc_string=doc,
        )
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        by_name = {o.name: o for o in inferred.graph.output}
        for o in m.graph.output:
            if not o.type.tensor_type.HasField("shape"):
                o.CopyFrom(by_name[o.name])
        return m


F32 = TensorProto.FLOAT


# ------------------------------------------------------------------------------------------
# model definitions
# ------------------------------------------------------------------------------------------
def standard() -> onnx.ModelProto:
    b = Builder("standard")
    h = b.conv("conv3x3", "x", 4, 8, 3, bias=True)
    h = b.relu("relu1", h)
    h = b.conv("conv5x5_s2", h, 8, 8, 5, stride=2, auto_pad="SAME_UPPER")
    h = b.relu("relu2", h)
    b.conv("conv7x7", h, 8, 8, 7, out="y")
    return b.model(
        [("x", F32, [1, 4, 16, 16])],
        [("y", F32, None)],
        "standard convs: 3x3 s1 p1 with bias, 5x5 s2 auto_pad SAME_UPPER, 7x7 p3",
    )


def pointwise() -> onnx.ModelProto:
    b = Builder("pointwise")
    b.conv("conv1x1", "x", 8, 16, 1, out="y")
    return b.model([("x", F32, [1, 8, 16, 16])], [("y", F32, None)], "one 1x1 (pointwise) conv")


def depthwise() -> onnx.ModelProto:
    b = Builder("depthwise")
    h = b.conv("dw3x3", "x", 8, 8, 3, group=8)
    h = b.relu("relu", h)
    b.conv("dw3x3_mult2", h, 8, 16, 3, group=8, out="y")
    return b.model(
        [("x", F32, [1, 8, 16, 16])],
        [("y", F32, None)],
        "depthwise 3x3 (group=C=8) then depthwise 3x3 with channel multiplier 2 (group=8, 8->16)",
    )


def grouped() -> onnx.ModelProto:
    b = Builder("grouped")
    h = b.conv("gconv3x3_g4", "x", 8, 16, 3, group=4)
    h = b.relu("relu", h)
    b.conv("gconv3x3_g2", h, 16, 8, 3, group=2, out="y")
    return b.model(
        [("x", F32, [1, 8, 16, 16])],
        [("y", F32, None)],
        "grouped 3x3 convs: group 4 (8->16) then group 2 (16->8)",
    )


def shuffle() -> onnx.ModelProto:
    b = Builder("shuffle")
    g, c, hw = 2, 16, 16
    h = b.conv("gpw1", "x", 8, c, 1, group=g)
    h = b.relu("gpw1/relu", h)
    s1 = b.init("shuffle/shape1", np.array([1, g, c // g, hw, hw], np.int64))
    h = b.node("Reshape", "shuffle/reshape1", [h, s1])
    h = b.node("Transpose", "shuffle/transpose", [h], perm=[0, 2, 1, 3, 4])
    s2 = b.init("shuffle/shape2", np.array([1, c, hw, hw], np.int64))
    h = b.node("Reshape", "shuffle/reshape2", [h, s2])
    h = b.conv("dw3x3", h, c, c, 3, group=c)
    b.conv("gpw2", h, c, 8, 1, group=g, out="y")
    return b.model(
        [("x", F32, [1, 8, hw, hw])],
        [("y", F32, None)],
        "ShuffleNet block: grouped 1x1 (g=2) -> channel shuffle (Reshape/Transpose/Reshape) "
        "-> depthwise 3x3 -> grouped 1x1 (g=2)",
    )


def dilated() -> onnx.ModelProto:
    b = Builder("dilated")
    h = b.conv("conv_d1", "x", 4, 8, 3, dilation=1)
    h = b.relu("relu1", h)
    h = b.conv("conv_d2", h, 8, 8, 3, dilation=2)
    h = b.relu("relu2", h)
    b.conv("conv_d4", h, 8, 8, 3, dilation=4, out="y")
    return b.model(
        [("x", F32, [1, 4, 32, 32])],
        [("y", F32, None)],
        "chain of 3x3 convs with dilations 1, 2, 4 (pads = dilation); receptive field 15x15",
    )


def transposed() -> onnx.ModelProto:
    b = Builder("transposed")
    h = b.conv_transpose("up_k2s2", "x", 8, 8, 2, stride=2)
    h = b.relu("relu", h)
    b.conv_transpose(
        "up_k3s2_g2", h, 8, 8, 3, stride=2, pads=(1, 1, 1, 1), output_padding=(1, 1), group=2, bias=False, out="y"
    )
    return b.model(
        [("x", F32, [1, 8, 8, 8])],
        [("y", F32, None)],
        "ConvTranspose k=2 s=2 (k divisible by s) then ConvTranspose k=3 s=2 pads 1 "
        "output_padding 1 group 2 (checkerboard risk)",
    )


def spatial_separable() -> onnx.ModelProto:
    b = Builder("spatial_separable")
    h = b.conv("conv3x1", "x", 4, 8, (3, 1))
    h = b.conv("conv1x3", h, 8, 8, (1, 3))
    h = b.relu("relu", h)
    h = b.conv("conv1x5", h, 8, 8, (1, 5))
    b.conv("conv5x1", h, 8, 8, (5, 1), out="y")
    return b.model(
        [("x", F32, [1, 4, 16, 16])],
        [("y", F32, None)],
        "spatially separable pairs: 3x1 -> 1x3 and 1x5 -> 5x1 (random, not rank-1, weights)",
    )


def separable_block() -> onnx.ModelProto:
    b = Builder("separable_block")
    h = b.conv("dw", "x", 8, 8, 3, group=8, bias=False)
    h = b.bn("dw/bn", h, 8)
    h = b.relu("dw/relu", h)
    b.conv("pw", h, 8, 16, 1, out="y")
    return b.model(
        [("x", F32, [1, 8, 16, 16])],
        [("y", F32, None)],
        "MobileNet depthwise-separable block: depthwise 3x3 -> BatchNormalization -> Relu -> pointwise 1x1",
    )


def conv1d() -> onnx.ModelProto:
    b = Builder("conv1d")
    h = b.conv("conv_k3", "x", 4, 8, 3, ndim=1, pads=[1, 1])
    h = b.relu("relu1", h)
    h = b.conv("causal_k3_d2", h, 8, 8, 3, ndim=1, dilation=2, pads=[4, 0])
    h = b.relu("relu2", h)
    pads = b.init("causal_pad/pads", np.array([0, 0, 4, 0, 0, 0], np.int64))
    h = b.node("Pad", "causal_pad", [h, pads], mode="constant")
    b.conv("causal_pad/conv", h, 8, 8, 3, ndim=1, dilation=2, pads=[0, 0], out="y")
    return b.model(
        [("x", F32, [1, 4, 32])],
        [("y", F32, None)],
        "1D convs: k=3 pads [1,1]; causal k=3 d=2 pads [4,0]; causal as Pad(left 4) -> conv without pads",
    )


def conv3d() -> onnx.ModelProto:
    b = Builder("conv3d")
    b.conv("conv3x3x3", "x", 4, 8, 3, ndim=3, out="y")
    return b.model([("x", F32, [1, 4, 8, 8, 8])], [("y", F32, None)], "one 3D conv 3x3x3 pads 1 with bias")


def conv_bn() -> onnx.ModelProto:
    b = Builder("conv_bn")
    h = b.conv("block1/conv", "x", 4, 8, 3, bias=False)
    h = b.bn("block1/bn", h, 8)
    h = b.relu("block1/relu", h)
    h = b.conv("block2/conv", h, 8, 8, 3, bias=False)
    h = b.bn("block2/bn", h, 8)
    b.relu("block2/relu", h, out="y")
    return b.model(
        [("x", F32, [1, 4, 16, 16])],
        [("y", F32, None)],
        "two Conv(no bias) -> BatchNormalization(eps 1e-5) -> Relu blocks (BN folding target)",
    )


def quantized() -> onnx.ModelProto:
    b = Builder("quantized")
    cin, cout = 4, 8
    x_scale, x_zp = np.float32(8.0 / 255), np.uint8(128)
    y_scale, y_zp = np.float32(12.0 / 255), np.uint8(128)
    xs = b.init("quant/x_scale", np.array(x_scale))
    xz = b.init("quant/x_zero_point", np.array(x_zp))
    xq = b.node("QuantizeLinear", "quant", ["x", xs, xz])

    # QLinearConv: uint8 activations, per-channel int8 weights, int32 bias.
    wf = b.conv_weight(cin, cout, (3, 3))
    w_scale = (np.abs(wf).reshape(cout, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(wf / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    bias_f = b.small((cout,))
    bias_q = np.round(bias_f / (x_scale * w_scale)).astype(np.int32)
    q_inputs = [
        xq,
        xs,
        xz,
        b.init("qconv/w", w_q),
        b.init("qconv/w_scale", w_scale),
        b.init("qconv/w_zero_point", np.zeros(cout, np.int8)),
        b.init("qconv/y_scale", np.array(y_scale)),
        b.init("qconv/y_zero_point", np.array(y_zp)),
        b.init("qconv/B", bias_q),
    ]
    yq = b.node("QLinearConv", "qconv", q_inputs, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    y1 = b.node("DequantizeLinear", "qconv/dequant", [yq, "qconv/y_scale", "qconv/y_zero_point"])

    # ConvInteger: uint8 activations and uint8 weights, both with zero points.
    wf2 = b.conv_weight(cin, cout, (3, 3))
    w2_scale = np.float32(np.abs(wf2).max() / 127)
    w2_zp = np.uint8(128)
    w2_q = np.clip(np.round(wf2 / w2_scale) + 128, 0, 255).astype(np.uint8)
    ci_inputs = [xq, b.init("convint/w", w2_q), xz, b.init("convint/w_zero_point", np.array(w2_zp))]
    acc = b.node("ConvInteger", "convint", ci_inputs, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    accf = b.node("Cast", "convint/cast", [acc], to=TensorProto.FLOAT)
    y2 = b.node("Mul", "convint/rescale", [accf, b.init("convint/scale", np.array(x_scale * w2_scale, np.float32))])
    b.node("Add", "sum", [y1, y2], out="y")
    return b.model(
        [("x", F32, [1, cin, 16, 16])],
        [("y", F32, None)],
        "QuantizeLinear(uint8) -> QLinearConv(int8 per-channel weights, int32 bias) -> DequantizeLinear, "
        "plus ConvInteger(uint8 x/w with zero points) -> Cast -> Mul; outputs added",
    )


def constant_weights() -> onnx.ModelProto:
    b = Builder("constant_weights")
    # (a) weight from a Constant node (as PP-OCR exports store them)
    wa = b.node("Constant", "conv_a/W_const", [], value=numpy_helper.from_array(b.conv_weight(4, 8, (3, 3)), "wa"))
    h = b.node("Conv", "conv_a", ["x", wa], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = b.relu("relu_a", h)
    # (b) weight from ConstantOfShape of a constant shape, non-zero fill value
    shape = b.node(
        "Constant", "conv_b/W_shape", [], value=numpy_helper.from_array(np.array([8, 8, 1, 1], np.int64), "shape")
    )
    wb = b.node(
        "ConstantOfShape", "conv_b/W_fill", [shape], value=numpy_helper.from_array(np.array([0.125], np.float32), "v")
    )
    h = b.node("Conv", "conv_b", [h, wb], kernel_shape=[1, 1])
    # (c) weight from DequantizeLinear of an int8 initializer (per output channel)
    wf = b.conv_weight(8, 8, (3, 3))
    scale = (np.abs(wf).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    wq = np.clip(np.round(wf / scale[:, None, None, None]), -127, 127).astype(np.int8)
    dq_inputs = [
        b.init("conv_c/W_q", wq),
        b.init("conv_c/W_scale", scale),
        b.init("conv_c/W_zero_point", np.zeros(8, np.int8)),
    ]
    wc = b.node("DequantizeLinear", "conv_c/W_dequant", dq_inputs, axis=0)
    b.node("Conv", "conv_c", [h, wc], "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.model(
        [("x", F32, [1, 4, 16, 16])],
        [("y", F32, None)],
        "conv weights from (a) a Constant node, (b) ConstantOfShape(Constant shape, value 0.125), "
        "(c) DequantizeLinear of an int8 initializer (axis 0)",
    )


def subgraph() -> onnx.ModelProto:
    b = Builder("subgraph")
    hw = 16
    h = b.conv("main/conv", "x", 4, 8, 3)
    mean = b.node("ReduceMean", "cond/mean", [h], keepdims=0)
    zero = b.init("cond/zero", np.array(0.0, np.float32))
    cond = b.node("Greater", "cond/greater", [mean, zero])
    w_then = b.init("then/conv/W", b.conv_weight(8, 8, (3, 3)))
    w_else = b.init("else/conv/W", b.conv_weight(8, 8, (1, 1)))
    out_info = [helper.make_tensor_value_info("then_y", F32, [1, 8, hw, hw])]
    then_g = helper.make_graph(
        [helper.make_node("Conv", [h, w_then], ["then_y"], name="then/conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "then_branch",
        [],
        out_info,
    )
    else_g = helper.make_graph(
        [helper.make_node("Conv", [h, w_else], ["else_y"], name="else/conv", kernel_shape=[1, 1])],
        "else_branch",
        [],
        [helper.make_tensor_value_info("else_y", F32, [1, 8, hw, hw])],
    )
    b.node("If", "if", [cond], "y", then_branch=then_g, else_branch=else_g)
    return b.model(
        [("x", F32, [1, 4, hw, hw])],
        [("y", F32, [1, 8, hw, hw])],
        "main-graph 3x3 conv, then If(mean > 0): then-branch 3x3 conv, else-branch 1x1 conv, both on the "
        "outer-scope tensor main/conv_out with outer-graph initializer weights",
    )


def dynamic() -> onnx.ModelProto:
    b = Builder("dynamic")
    h = b.conv("conv1", "x", 3, 8, 3)
    h = b.relu("relu1", h)
    h = b.conv("conv2_s2", h, 8, 16, 3, stride=2)
    h = b.relu("relu2", h)
    b.conv("conv3_1x1", h, 16, 4, 1, out="y")
    return b.model(
        [("x", F32, ["N", 3, "H", "W"])],
        [("y", F32, ["N", 4, "H_out", "W_out"])],
        "small CNN with dynamic batch and spatial dims: 3x3 -> 3x3 s2 -> 1x1",
    )


def sample() -> onnx.ModelProto:
    b = Builder("sample")
    h = b.conv("stem/conv", "x", 3, 16, 3, stride=2)  # 64 -> 32
    h = b.relu("stem/relu", h)
    h = b.conv("block1/conv", h, 16, 16, 3, bias=False)
    h = b.bn("block1/bn", h, 16)
    h = b.relu("block1/relu", h)
    h = b.conv("block2/dw", h, 16, 16, 3, group=16, bias=False)
    h = b.bn("block2/dw_bn", h, 16)
    h = b.relu("block2/dw_relu", h)
    h = b.conv("block2/pw", h, 16, 24, 1)
    h = b.relu("block2/pw_relu", h)
    h = b.conv("block3/dilated", h, 24, 24, 3, dilation=2)
    h = b.relu("block3/relu", h)
    h = b.conv("block4/conv5x5", h, 24, 16, 5, stride=2)  # 32 -> 16
    h = b.relu("block4/relu", h)
    h = b.conv_transpose("up/deconv", h, 16, 16, 3, stride=2, pads=(1, 1, 1, 1), output_padding=(1, 1))  # -> 32
    h = b.relu("up/relu", h)
    h = b.conv("head/conv1x1", h, 16, 32, 1)
    h = b.relu("head/relu", h)
    h = b.node("GlobalAveragePool", "head/gap", [h])
    h = b.node("Flatten", "head/flatten", [h], axis=1)
    fc_w = b.init("head/fc/W", b.he((10, 32), 32))
    fc_b = b.init("head/fc/B", b.small((10,)))
    b.node("Gemm", "head/fc", [h, fc_w, fc_b], "logits", transB=1)
    return b.model(
        [("x", F32, [1, 3, 64, 64])],
        [("logits", F32, None)],
        "demo CNN classifier: stem 3x3 s2 -> conv+BN+relu -> depthwise-separable block -> dilated 3x3 d2 "
        "-> 5x5 s2 -> ConvTranspose k3 s2 -> 1x1 -> GlobalAveragePool -> Flatten -> Gemm(10)",
    )


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "standard": standard,
    "pointwise": pointwise,
    "depthwise": depthwise,
    "grouped": grouped,
    "shuffle": shuffle,
    "dilated": dilated,
    "transposed": transposed,
    "spatial_separable": spatial_separable,
    "separable_block": separable_block,
    "conv1d": conv1d,
    "conv3d": conv3d,
    "conv_bn": conv_bn,
    "quantized": quantized,
    "constant_weights": constant_weights,
    "subgraph": subgraph,
    "dynamic": dynamic,
    "sample": sample,
}


def write_models(out: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Build, check and write the named models (default: all) into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(MODELS):
        model = MODELS[name]()
        onnx.checker.check_model(model, full_check=True)
        path = out / f"{name}.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to write (default: all): {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    for path in write_models(args.out, args.names):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
