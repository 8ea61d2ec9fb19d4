"""Receptive field and effective stride of every tensor, relative to the model input, in one pass.

Each tensor with a spatial meaning gets, per spatial dim (its last dims), a pair (r, j): the size
of the input window one of its elements sees and the input distance between neighbouring elements.
Graph inputs of rank ≥ 3 start at (1, 1). Convs and pools step it (``arithmetic.rf_step``); Resize,
DepthToSpace and SpaceToDepth rescale it; ops that keep the spatial grid pass the largest over their
inputs, ignoring broadcast inputs (squeeze-excitation gates, scalars). Whatever else changes the grid
(Flatten, MatMul, a Reshape touching the spatial dims, global pools) ends the trace: unknown.
"""

from __future__ import annotations

from fractions import Fraction

from ..model import arithmetic as ar
from ..model.convops import conv_op
from ..model.weights import constant_shape

RF = tuple  # tuple[tuple[int | Fraction, int | Fraction], ...] for the last len(RF) dims

_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_RESHAPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Tile"})
#: Ops that cut or pad the spatial grid without changing its step: the window stays the same.
_CROPS = frozenset({"Pad", "Slice", "Split", "Crop"})
#: Ops whose output is not on the input's spatial grid.
_BREAKS = frozenset({"MatMul", "Gemm", "Einsum", "Gather", "GatherElements", "GatherND", "ScatterND", "NonZero",
                     "TopK", "Shape", "Size", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax",
                     "ArgMin", "Loop", "Scan", "If", "RoiAlign", "GridSample"})
_RESIZE_TAPS = {"nearest": 1, "linear": 2, "cubic": 4}


def _static(shape) -> bool:
    return shape is not None and all(ar.known(d) for d in shape)


def receptive_fields(cg, outer: "dict[str, RF] | None" = None, order: "list[str] | None" = None) -> dict[str, RF]:
    """tensor name → per-dim (receptive field, jump) where determinable (ints; Fractions below one pixel).

    ``outer``: the map of the enclosing graph (for a subgraph); ``order``: ``cg``'s ops in topological order.
    """
    rf: dict[str, RF] = {}
    nodes = cg.graph._node  # networkx's node dict: a plain lookup per op
    if cg.parent is None:
        inputs, inits = [], set()
        for d in nodes.values():
            if d["kind"] == "input":
                inputs.append(d["proto"].name)
            elif d["kind"] == "initializer":
                inits.add(d["proto"].name)
        for name in inputs:
            shape = cg.shape(name)
            if name not in inits and shape is not None and len(shape) >= 3:
                rf[name] = ((1, 1),) * (len(shape) - 2)
    elif outer:
        for t in cg.outer_refs():
            if t in outer:
                rf[t] = outer[t]
    get = rf.get
    for nid in order if order is not None else cg.ops():
        d = nodes[nid]
        node = d["proto"]
        ins = [get(t) for t in node.input]  # "" (an omitted input) is never a key
        if ins.count(None) == len(ins):
            continue
        for t, v in _step(cg, d, node, ins).items():
            if v is not None:
                rf[t] = v
    return rf


def _step(cg, d: dict, node, ins: list) -> dict[str, RF | None]:
    op, attrs = d["op_type"], d["attrs"]
    outs = [o for o in node.output if o]
    if not outs:
        return {}
    x = ins[0] if ins else None
    spec = conv_op(d)
    if spec is not None or op in _POOLS:
        if x is None:
            return {}
        kernel = attrs.get("kernel_shape")
        if kernel is None and spec is not None:
            w = constant_shape(cg, node.input[spec.weight]) if len(node.input) > spec.weight else None
            kernel = w[2:] if w else None
        nd = len(kernel) if kernel else 0
        strides = attrs.get("strides") or [1] * nd
        dilations = attrs.get("dilations") or [1] * nd
        if not nd or len(x) != nd or len(strides) != nd or len(dilations) != nd \
                or min(*kernel, *strides, *dilations) < 1:
            return {outs[0]: None}
        transposed = spec is not None and spec.transposed
        return {outs[0]: tuple(ar.rf_step(r, j, k, s, dd, transposed)
                               for (r, j), k, s, dd in zip(x, kernel, strides, dilations))}
    if op in _GLOBAL_POOLS:
        shape = cg.shape(node.input[0])
        if x is None or not _static(shape):
            return {}
        sizes = shape[-len(x):]
        return {outs[0]: tuple((r + (n - 1) * j, j * n) for (r, j), n in zip(x, sizes))}
    if op in ("Resize", "Upsample"):
        return {outs[0]: _resize(cg, node, attrs, x)}
    if op in ("DepthToSpace", "SpaceToDepth"):
        b = int(attrs.get("blocksize", 1))
        if x is None or len(x) != 2 or b < 1:
            return {}
        if op == "DepthToSpace":
            return {outs[0]: tuple((r, Fraction(j) / b) for r, j in x)}
        return {outs[0]: tuple((r + (b - 1) * j, j * b) for r, j in x)}
    if op == "Transpose":
        perm = attrs.get("perm")
        if x is None or perm is None:
            return {}
        n = len(perm)
        keep = list(perm[n - len(x):]) == list(range(n - len(x), n))
        return {outs[0]: x if keep else None}
    if op in _RESHAPES:
        a, b = cg.shape(node.input[0]), cg.shape(outs[0])
        if x is None or not _static(a) or not _static(b) or len(b) < len(x) + 2:
            return {}
        return {outs[0]: x if tuple(a[-len(x):]) == tuple(b[-len(x):]) else None}
    if op in _BREAKS:
        return {}
    return _elementwise(cg, node, ins, outs, op in _CROPS)


def _resize(cg, node, attrs: dict, x) -> RF | None:
    a, b = cg.shape(node.input[0]), cg.shape(node.output[0])
    if x is None or not _static(a) or not _static(b) or len(a) != len(b):
        return None
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    taps = _RESIZE_TAPS.get(mode, 1)
    out = []
    for (r, j), i, o in zip(x, a[-len(x):], b[-len(x):]):
        if i < 1 or o < 1:
            return None
        step = j * Fraction(i, o)
        out.append((r + (taps - 1) * step if taps > 1 and o != i else r, step))
    return tuple(out)


def _collapsed(shape, nd: int) -> bool:
    return (shape is not None and len(shape) >= nd and all(s == 1 for s in shape[len(shape) - nd:])
            and _static(shape))


def _elementwise(cg, node, ins: list, outs: list[str], crop: bool) -> dict[str, RF | None]:
    """Ops on the spatial grid: the largest window over the inputs that are not broadcast along it."""
    traced = [(t, v) for t, v in zip(node.input, ins) if v is not None]
    if len(traced) == 1:
        candidates = [traced[0][1]]
    else:  # inputs broadcast along the grid (an SE gate, a bias [1, C, 1, 1]) are not the spatial path
        candidates = [v for t, v in traced if not _collapsed(cg.shape(t), len(v))] or [v for _, v in traced]
    if not candidates or len({len(v) for v in candidates}) != 1:
        return {}
    if len(candidates) == 1:
        merged = candidates[0]
    else:
        merged = tuple((max(c[i][0] for c in candidates), max(c[i][1] for c in candidates))
                       for i in range(len(candidates[0])))
    nd = len(merged)
    result = {}
    for o in outs:
        shape = cg.shape(o)
        if shape is not None and len(shape) < nd + 2:
            continue
        if not crop and _collapsed(shape, nd) and not _collapsed(cg.shape(node.input[0]), nd):
            continue  # collapsed the grid
        result[o] = merged
    return result
