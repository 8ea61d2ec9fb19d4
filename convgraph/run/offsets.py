"""The tensors an output is a fixed offset of: what to judge beside it when a constant grid is added to it.

A detector that decodes its boxes in the graph adds a constant to its predictions: YOLOv8's boxes are
(anchor grid ± predicted distances) × strides, in pixels. The grid is the same on every input and dominates the
boxes' magnitude, so the boxes' cosine hardly moves when the distances do (YOLOv8n: 0.9993 while a box's IoU with
its reference fell to 0.70). :func:`offset_roots` walks back from each output through the ops that only move,
join, scale or add values (Concat, Split, Reshape…, Add/Sub, Mul/Div by a constant) and, where it passed an
Add or Sub of a constant tensor (not a scalar bias), returns the tensors where the walk stopped — the values the
model computed before the constants were added (YOLOv8n: the DFL's distances and the class scores). Judged beside
the outputs, they make a verdict see what the input changes. Linear in the graph's size.
"""

from __future__ import annotations

import math

import onnx

#: Ops that move or join values (the walk goes on through their data input(s)).
MOVES = frozenset({"Concat", "Split", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                   "Identity", "Expand"})
#: Element-wise linear ops (the walk goes on through their non-constant inputs; Mul and Div only by a constant).
LINEAR = frozenset({"Add", "Sub", "Mul", "Div", "Neg"})


def _constants(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensors of ``graph`` whatever the input's values → their element count (initializers, Constant nodes,
    shapes, and what ops on those alone make — YOLOv8's anchor grid is built from its feature maps' shapes: -1
    where the size is not known without running them)."""
    sizes = {t.name: math.prod(t.dims) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute:
            a = n.attribute[0]
            sizes[n.output[0]] = (math.prod(a.t.dims) if a.name == "value" else
                                  len(a.floats) or len(a.ints) or len(a.strings) if a.name.endswith("s") else 1)
        elif n.op_type in ("Shape", "Size"):
            sizes[n.output[0]] = -1
        elif n.input and all(not t or t in sizes for t in n.input) and n.op_type not in ("RandomNormal",
                                                                                       "RandomUniform"):
            for o in n.output:
                sizes[o] = -1
    return sizes


def note(roots: list[str]) -> str:
    """What a report says of the tensors judged beside the outputs."""
    return (f"judged beside the outputs: {', '.join(roots)} (what the outputs add constants to, such as an anchor "
            "grid, whose magnitude would hide their errors; --tensor to choose)")


def offset_roots(model: onnx.ModelProto) -> list[str]:
    """The tensors of ``model``'s main graph that its outputs are fixed offsets of (module doc), in graph order;
    none where no output has a constant tensor added on its way (the outputs say it all)."""
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output if o}
    order = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    found: set[str] = set()
    for out in g.output:
        roots: set[str] = set()
        offset = False
        stack, seen = [out.name], set()
        while stack:
            t = stack.pop()
            if t in seen or t in consts:
                continue
            seen.add(t)
            n = producer.get(t)
            if n is None:
                continue  # a graph input: the output passes it on
            acts = [x for x in n.input if x and x not in consts]
            if n.domain not in ("", "ai.onnx"):
                roots.add(t)
            elif n.op_type in MOVES:
                stack += acts[:1] if n.op_type != "Concat" else acts
            elif n.op_type in LINEAR and (n.op_type in ("Add", "Sub", "Neg") or len(acts) == 1):
                offset |= n.op_type in ("Add", "Sub") and any(consts[x] != 1 for x in n.input if x in consts)
                stack += acts
            else:
                roots.add(t)
        if offset:
            found |= roots - {o.name for o in g.output}
    return sorted(found, key=lambda t: order.get(t, -1))
