#!/usr/bin/env python
"""A conv chain with big weights, for memory measurements: N 3×3 convs of C channels, Relu between.

``python benchmarks/make_big.py OUT.onnx [--convs 60] [--channels 1024] [--size 4] [--embedded]``: sixty
1024-channel convs hold 2.26 GB of fp32 weights, past protobuf's 2 GB limit, so they go to
``OUT.onnx.data`` beside the model (external data, written one conv at a time: the weights are never all
in memory); ``--embedded`` keeps them inside the model file instead (under 2 GB only: ``--convs 25`` is
0.94 GB; convgraph writes it, streaming the weights). Input ``x`` [1, C, size, size]; weights He-scaled
normal (seed 0), so activations stay O(1) through the chain. Never commit what it writes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from onnx import TensorProto, helper


def make_big(path: str, convs: int = 60, channels: int = 1024, size: int = 4, embedded: bool = False) -> int:
    """Write the model to ``path`` (and ``path + ".data"`` unless ``embedded``); returns the weights' bytes."""
    if embedded:  # made with external data, then saved as one file by convgraph (which streams the weights)
        import tempfile

        import convgraph

        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
            n = make_big(os.path.join(tmp, "big.onnx"), convs, channels, size)
            convgraph.save(convgraph.load(os.path.join(tmp, "big.onnx")), path)
        return n
    rng = np.random.default_rng(0)
    location = os.path.basename(path) + ".data"
    nodes, inits, offset = [], [], 0
    with open(path + ".data", "wb") as data:
        x = "x"
        for i in range(convs):
            w = (rng.standard_normal((channels, channels, 3, 3), np.float32) * np.sqrt(2.0 / (9 * channels)))
            w = w.astype(np.float32)
            b = np.zeros(channels, np.float32)
            for name, a in ((f"w{i}", w), (f"b{i}", b)):
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=a.shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(a.nbytes))):
                    tensor.external_data.add(key=key, value=value)
                data.write(a.tobytes())
                offset += a.nbytes
                inits.append(tensor)
            y = "y" if i == convs - 1 else f"c{i}"
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], name=f"conv{i}", kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1]))
            if i < convs - 1:
                nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
                x = f"r{i}"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, f"big{convs}x{channels}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="convgraph-make_big")
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return convs * channels * (channels * 9 + 1) * 4


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--convs", type=int, default=60)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--embedded", action="store_true", help="weights inside the model file (under 2 GB only)")
    args = ap.parse_args(argv)
    n = make_big(args.out, args.convs, args.channels, args.size, args.embedded)
    print(f"{args.out}: {args.convs} convs, {n / 1e9:.2f} GB of weights"
          + ("" if args.embedded else f" in {os.path.basename(args.out)}.data"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
