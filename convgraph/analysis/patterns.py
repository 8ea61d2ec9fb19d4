"""Blocks of convolutions: depthwise-separable, spatially separable, flattened, channel shuffle, causal.

Convs are linked when one feeds the other's data input through per-element ops only (activations,
BatchNormalization, QDQ pairs, arithmetic with constants or per-channel gates such as a
squeeze-excitation scale). Every walk is bounded, so detection stays linear in the graph size.
"""

from __future__ import annotations

from ..model.record import ConvRecord
from ..model.weights import constant_shape, constant_value

#: Ops that act per element (or per channel) and keep the layout: allowed between the convs of a block.
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish",
    "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip", "Identity", "Dropout", "Cast", "Neg", "Abs",
    "Sqrt", "Exp", "Log", "Erf", "BatchNormalization", "InstanceNormalization", "QuantizeLinear", "DequantizeLinear",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Where",
})
SPLITS = frozenset({"Split", "Slice"})
#: Most nodes a walk from one conv looks at.
WALK_LIMIT = 48


def _is_constant(cg, tensor: str) -> bool:
    return constant_shape(cg, tensor) is not None


def _broadcast(cg, tensor: str, nd: int) -> bool:
    """Constant along the spatial grid (an SE gate [N, C, 1, 1], a scalar)."""
    shape = cg.shape(tensor)
    return shape is not None and (len(shape) < nd or all(s == 1 for s in shape[len(shape) - nd:]))


def next_convs(cg, tensor: str, convs: dict[str, ConvRecord], nd: int, through: frozenset = frozenset()) -> list[str]:
    """Conv ids whose data input is computed from ``tensor`` by per-element ops only (plus ``through`` ops)."""
    reached, queue, found, seen = {tensor}, [tensor], [], 0
    while queue and seen < WALK_LIMIT:
        t = queue.pop(0)
        for v in cg.consumers(t):
            seen += 1
            d = cg.graph.nodes[v]
            if d["kind"] != "op":
                continue
            node = d["proto"]
            if v in convs:
                if node.input and node.input[0] == t and v not in found:
                    found.append(v)
                continue
            op = d["op_type"]
            if op in through and node.input and node.input[0] == t:
                ok = True
            elif op in ELEMENTWISE:
                ok = all(not i or i in reached or _is_constant(cg, i) or _broadcast(cg, i, nd) for i in node.input)
            else:
                ok = False
            if ok:
                for o in node.output:
                    if o and o not in reached:
                        reached.add(o)
                        queue.append(o)
    return found


def prev_convs(cg, tensor: str, convs: dict[str, ConvRecord], through: frozenset = frozenset({"Concat"})) -> list[str]:
    """Conv ids that feed ``tensor`` through per-element ops (their first input) and ``through`` ops (all inputs)."""
    queue, found, seen = [tensor], [], 0
    while queue and seen < WALK_LIMIT:
        t = queue.pop(0)
        src = cg.producer(t)
        seen += 1
        if src is None or cg.graph.nodes[src]["kind"] != "op":
            continue
        if src in convs:
            if src not in found:
                found.append(src)
            continue
        d = cg.graph.nodes[src]
        node = d["proto"]
        if d["op_type"] in through:
            queue.extend(i for i in node.input if i)
        elif d["op_type"] in ELEMENTWISE and node.input:
            queue.append(node.input[0])
    return found


def _mark(r: ConvRecord, pattern: str) -> None:
    if pattern not in r.patterns:
        r.patterns.append(pattern)


def _line(r: ConvRecord) -> str | None:
    """'v' for a k×1 kernel, 'h' for 1×k (k > 1), else None."""
    if r.spatial_dims != 2 or r.kind == "transposed":
        return None
    kh, kw = r.kernel
    if kh > 1 and kw == 1:
        return "v"
    if kh == 1 and kw > 1:
        return "h"
    return None


def spatially_separable(a: ConvRecord, b: ConvRecord) -> bool:
    """k×1 followed by 1×k (or the reverse), same k."""
    la, lb = _line(a), _line(b)
    return la is not None and lb is not None and la != lb and max(a.kernel) == max(b.kernel)


def causal(cg, r: ConvRecord) -> bool:
    """A 1D conv whose padding (its own plus a constant Pad right before it) is all at the start."""
    if r.spatial_dims != 1 or r.dilations[0] * (r.kernel[0] - 1) == 0 or None in r.pads:
        return False
    begin, end = r.pads
    src = cg.producer(r.input)
    if src is not None and cg.graph.nodes[src].get("op_type") == "Pad":
        extra = _pad_last_axis(cg, cg.graph.nodes[src])
        if extra is not None:
            begin, end = begin + extra[0], end + extra[1]
    return begin > 0 and end == 0


def _pad_last_axis(cg, d: dict) -> tuple[int, int] | None:
    """(begin, end) padding of a constant-mode Pad on the last axis; None if it pads other axes or is not constant."""
    node, attrs = d["proto"], d["attrs"]
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if "pads" in attrs:
        pads = list(attrs["pads"])
    elif len(node.input) > 1 and node.input[1]:
        v = constant_value(cg, node.input[1])
        if v is None:
            return None
        pads = [int(p) for p in v.reshape(-1)]
    else:
        return None
    n = len(pads) // 2
    rank = len(cg.shape(node.input[0]) or ()) or n
    axes = list(range(n))
    if len(node.input) > 3 and node.input[3]:
        a = constant_value(cg, node.input[3])
        if a is None:
            return None
        axes = [int(x) % rank for x in a.reshape(-1)]
    last = rank - 1
    begin = end = 0
    for i, ax in enumerate(axes):
        b, e = pads[i], pads[i + n]
        if ax % rank == last:
            begin, end = b, e
        elif b or e:
            return None
    return begin, end


def _shuffles(cg, order: list[str]) -> list[tuple[str, str, int]]:
    """(first Reshape input, last Reshape output, spatial dims) per Reshape → Transpose(swap 1, 2) → Reshape."""
    found = []
    nodes = cg.graph._node  # networkx's node dict: a plain lookup per op
    for nid in order:
        d = nodes[nid]
        if d["op_type"] != "Transpose":
            continue
        perm = list(d["attrs"].get("perm", []))
        if len(perm) < 4 or perm[:3] != [0, 2, 1] or perm[3:] != list(range(3, len(perm))):
            continue
        node = d["proto"]
        r1 = cg.producer(node.input[0])
        users = cg.consumers(node.output[0])
        if r1 is None or cg.graph.nodes[r1].get("op_type") != "Reshape" or len(users) != 1:
            continue
        r2 = users[0]
        if cg.graph.nodes[r2].get("op_type") != "Reshape":
            continue
        n1, n2 = cg.node(r1), cg.node(r2)
        s1, s2 = constant_shape(cg, n1.input[1]), constant_shape(cg, n2.input[1])
        if s1 != (len(perm),) or s2 != (len(perm) - 1,):
            continue
        found.append((n1.input[0], n2.output[0], len(perm) - 3))
    return found


def detect_patterns(cg, records: list[ConvRecord], order: "list[str] | None" = None) -> None:
    """Fill ``patterns`` of the records of one graph (in place); ``order``: the graph's ops in topological order."""
    convs = {r.node_id: r for r in records}
    # only depthwise, pointwise and k×1 / 1×k convs start a block: the others need no walk
    starts = [r for r in records if r.kind in ("depthwise", "pointwise", "pointwise_grouped") or _line(r)]
    following = {r.node_id: next_convs(cg, r.output, convs, r.spatial_dims) for r in starts}
    for r in records:
        for nid in following.get(r.node_id, ()):
            n = convs[nid]
            pointwise = n.kind in ("pointwise", "pointwise_grouped")
            if r.kind == "depthwise" and pointwise and r.spatial_dims == n.spatial_dims:
                _mark(r, "depthwise_separable")
                _mark(n, "depthwise_separable")
            if spatially_separable(r, n):
                _mark(r, "spatially_separable")
                _mark(n, "spatially_separable")
                for p in prev_convs(cg, r.input, convs, through=frozenset()):
                    if convs[p].kind in ("pointwise", "pointwise_grouped") and r.node_id in following.get(p, ()):
                        for x in (convs[p], r, n):
                            _mark(x, "flattened")
        if causal(cg, r):
            _mark(r, "causal")
    for src, dst, nd in _shuffles(cg, order if order is not None else cg.topological_order()):
        for nid in prev_convs(cg, src, convs) + next_convs(cg, dst, convs, nd, through=SPLITS):
            _mark(convs[nid], "channel_shuffle")
