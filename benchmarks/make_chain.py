#!/usr/bin/env python
"""A long conv chain ONNX model for scaling benchmarks: Conv → Relu → Conv → Relu → ...

``make_chain(n_nodes)`` returns a model of exactly ``n_nodes`` nodes (alternating 3×3 Conv with
bias and Relu, 8 channels, input ``x`` [1, 8, 16, 16]; every conv keeps the size). Weights are
deterministic and small, so a 40k-node model is about 17 MB.

Usage: ``python benchmarks/make_chain.py N OUT.onnx``.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 8
SIZE = 16


def make_chain(n_nodes: int, channels: int = CHANNELS, size: int = SIZE, dynamic: bool = False) -> onnx.ModelProto:
    """A valid opset-17 model of ``n_nodes`` nodes: Conv, Relu, Conv, Relu, ... (the last may be a Conv);
    ``dynamic``: the input's batch, height and width are the dim names N, H, W (symbols for the analyzer)."""
    if n_nodes < 1:
        raise ValueError("n_nodes must be at least 1")
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(n_nodes):
        y = "y" if i == n_nodes - 1 else f"t{i}"
        if i % 2 == 0:
            w = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            inits.append(numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}"))
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], name=f"conv{i}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        else:
            nodes.append(helper.make_node("Relu", [x], [y], name=f"relu{i}"))
        x = y
    shape: list[str | int] = ["N", channels, "H", "W"] if dynamic else [1, channels, size, size]
    graph = helper.make_graph(nodes, f"chain{n_nodes}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="convgraph-make_chain")
    model.ir_version = 8
    return model


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    onnx.save(make_chain(int(argv[0])), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
