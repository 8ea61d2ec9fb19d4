"""Static shape and value propagation: every tensor's shape without running the model, dynamic dims as symbols.

onnx's own inference (``data_prop=True``) runs first (:func:`convgraph.model.shapes._infer`); :func:`propagate`
then walks each graph in topological order and computes, per tensor, its shape (dims: ints,
:class:`~convgraph.model.expr.Expr` over the input symbols, or None) and, for small tensors, the values of their
elements (shape arithmetic: ints, exact rationals, Exprs; None per unknown element). Ops it has no rule
for take onnx's inferred shape, onnx's dim names (``unk__3``) translated through what the rules found
for the same dims. If/Loop/Scan bodies are walked with the outer shapes; an If whose condition is known
takes only its branch (the other is still walked, its ConvGraph marked ``taken = False``).
Assumptions where a symbol's value would decide: symbols are ≥ 1 and larger than the constant indices
that slice them, and dims that broadcast against each other are equal.
"""

from __future__ import annotations

import functools
import keyword
import math
import re
from collections import ChainMap
from fractions import Fraction
from typing import Callable, NamedTuple, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from .convops import conv_op
from .expr import Expr, floor_div, is_dim

SMALL = 1024  #: integer tensors with at most this many elements carry their values
SMALL_FLOAT = 64  #: float tensors likewise (Resize scales, constants of shape arithmetic; weights do not)
_BIG = 2**30  #: a slice bound at least this is "to the end"
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
_BOOL = onnx.TensorProto.BOOL
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


class Val(NamedTuple):
    """What is known of a tensor: element type, shape (None when unknown) and values (object array or None)."""

    elem: int
    shape: tuple | None
    value: np.ndarray | None = None


class _Shaped(Protocol):
    """A :class:`Val` whose shape is known: what a :func:`_shaped` rule is handed."""

    @property
    def elem(self) -> int: ...
    @property
    def shape(self) -> tuple: ...
    @property
    def value(self) -> np.ndarray | None: ...


# ---- symbols ------------------------------------------------------------------------------------------
_LETTERS = {3: "NCL", 4: "NCHW", 5: "NCDHW"}


def _identifier(text: str) -> str:
    ident = re.sub(r"\W", "_", text)
    if not ident or ident[0].isdigit():
        ident = "d_" + ident
    return ident + "_" if keyword.iskeyword(ident) else ident


def input_symbols(inputs: list[tuple[str, tuple | None]]) -> tuple[dict[str, dict], dict]:
    """Symbols for the dynamic dims of the inputs ``[(name, dims)]`` (dims: ints, dim names or None).

    Returns ``{identifier: {"input", "axis"}}`` and ``{(input, axis): Expr}``. A dim name that is a
    valid Python identifier is kept (one symbol for every dim of that name); others become ``N``, ``H``,
    ``W``… by position in image-like inputs, else ``<input>_<axis>``.
    """
    symbols: dict[str, dict] = {}
    by_name: dict[str, Expr] = {}
    dims: dict = {}
    for name, given in inputs:
        shape = given or ()
        for axis, d in enumerate(shape):
            if isinstance(d, int):
                continue
            shared = isinstance(d, str) and any(ch.isalnum() for ch in d)  # "?" (Paddle) names no dim
            if shared and d in by_name:
                dims[(name, axis)] = by_name[d]
                continue
            if isinstance(d, str) and d.isidentifier() and not keyword.iskeyword(d):
                ident = d
            elif len(shape) in _LETTERS:
                ident = _LETTERS[len(shape)][axis]
            else:
                ident = f"{_identifier(name)}_{axis}"
            base, n = ident, 1
            while ident in symbols:
                n += 1
                ident = f"{base}{n}"
            symbols[ident] = {"input": name, "axis": axis}
            dims[(name, axis)] = sym = Expr.symbol(ident)
            if shared:
                by_name[d] = sym
    return symbols, dims


# ---- helpers --------------------------------------------------------------------------------------------
def _number(x):
    """An element as an int, Fraction, bool or Expr (floats exact; non-finite ones unknown)."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            return None
        f = Fraction(float(x))
        return int(f) if f.denominator == 1 else f
    return x


def array_value(a: np.ndarray) -> np.ndarray | None:
    """A numpy array as a value (object array of exact numbers), when small and numeric: integer tensors of
    up to :data:`SMALL` elements, float ones of up to :data:`SMALL_FLOAT` (scales, not weights)."""
    if a.size > (SMALL_FLOAT if a.dtype.kind == "f" else SMALL) or a.dtype.kind not in "biuf":
        return None
    out = np.empty(a.shape, dtype=object)
    items = a.reshape(-1).tolist()  # Python ints and bools already
    out.reshape(-1)[:] = [_number(x) for x in items] if a.dtype.kind == "f" else items
    return out


def _dim(x):
    """An element used as a dim or index: int or Expr, else None."""
    if isinstance(x, Fraction):
        return int(x) if x.denominator == 1 else None
    return x if is_dim(x) and (not isinstance(x, Expr) or x.integral()) else None


def _ints(v: np.ndarray | None) -> list | None:
    """A 0-/1-D value as a list of dims (int or Expr; None elements stay None)."""
    return None if v is None else [_dim(x) for x in v.reshape(-1)]


def _consts(v: np.ndarray | None) -> list[int] | None:
    """A value whose elements are all ints, as a list; else None."""
    xs = _ints(v)
    return xs if xs is not None and all(type(x) is int for x in xs) else None


def _numel(shape) -> "int | Expr | None":
    if shape is None:
        return None
    n = 1
    for d in shape:
        if d is None:
            return None
        n = n * d
    return n


def _elementwise(f: Callable, *values: np.ndarray):
    """Apply ``f`` per element with numpy broadcasting; an element is None where an operand is or ``f`` fails."""
    def g(*xs):
        if any(x is None for x in xs):
            return None
        try:
            r = f(*xs)
        except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
            return None
        return None if r is NotImplemented else r
    try:
        out = _obj(np.frompyfunc(g, len(values), 1)(*values))
    except ValueError:
        return None
    return out if out.size <= SMALL else None


def _obj(x) -> np.ndarray:
    """``x`` as an object array; a scalar (numpy returns bare elements for 0-d results) as a 0-d one."""
    if isinstance(x, np.ndarray):
        return x if x.dtype == object else x.astype(object)
    out = np.empty((), dtype=object)
    out[()] = x
    return out


def _bdim(a, b):
    """Broadcast two dims: 1 yields to the other; equal stay; unknown vs known takes the known one."""
    if a == 1:
        return b
    if b == 1 or b is None or a == b:
        return a
    if a is None:
        return b
    return a if isinstance(a, int) else b  # two symbols that must be equal: keep either (an int wins)


def broadcast(*shapes) -> tuple | None:
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        pad = (1,) * (rank - len(s)) + tuple(s)
        out = [_bdim(a, b) for a, b in zip(out, pad)]
    return tuple(out)


def _trunc_div(a, b):
    """ONNX integer Div: truncates toward zero on ints; Exprs (dims, ≥ 0) floor."""
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b


def _to_int(x):
    """Cast to an integer type: truncation; an Expr with rational coefficients (≥ 0) floors."""
    if isinstance(x, Expr):
        return x if x.integral() else x.floor()
    if isinstance(x, Fraction):
        return math.trunc(x)
    return int(x)


def _ceil(x):
    return -floor_div(-x, Fraction(1)) if isinstance(x, Expr) else math.ceil(x)


def _floor(x):
    return floor_div(x, Fraction(1)) if isinstance(x, Expr) else math.floor(x)


def _eq(a, b):
    if isinstance(a, Expr) or isinstance(b, Expr):
        if a == b:
            return True
        raise ValueError("undecided")
    return a == b


def _cmp(op):
    def f(a, b):
        d = a - b
        if isinstance(d, Expr):
            raise ValueError("undecided")
        return op(d, 0)
    return f


def _min(a, b):
    d = a - b
    if isinstance(d, Expr):
        raise ValueError("undecided")
    return a if d <= 0 else b


def _max(a, b):
    d = a - b
    if isinstance(d, Expr):
        raise ValueError("undecided")
    return a if d >= 0 else b


_BINARY = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Mod": lambda a, b: a % b, "Pow": lambda a, b: a ** b if type(b) is int and b >= 0 and not isinstance(a, Expr)
    else (a * a if b == 2 else None),
    "Equal": _eq, "Less": _cmp(lambda d, z: d < z), "Greater": _cmp(lambda d, z: d > z),
    "LessOrEqual": _cmp(lambda d, z: d <= z), "GreaterOrEqual": _cmp(lambda d, z: d >= z),
    "And": lambda a, b: bool(a) and bool(b), "Or": lambda a, b: bool(a) or bool(b),
    "Xor": lambda a, b: bool(a) != bool(b),
}
_UNARY_VALUES = {
    "Neg": lambda a: -a, "Abs": lambda a: abs(a) if not isinstance(a, Expr) else a, "Floor": _floor, "Ceil": _ceil,
    "Not": lambda a: not a, "Identity": lambda a: a, "Sign": lambda a: (a > 0) - (a < 0),
    "Reciprocal": lambda a: 1 / Fraction(a),
}
#: Ops whose (first) output has the shape of their first input.
SAME_SHAPE = frozenset("""Relu Sigmoid Tanh HardSigmoid HardSwish LeakyRelu Clip Exp Log Softmax LogSoftmax
BatchNormalization InstanceNormalization LayerNormalization GroupNormalization Dropout Erf Sqrt Reciprocal Sin Cos
Tan Asin Acos Atan Sinh Cosh Elu Selu Softplus Softsign Mish Gelu Celu ThresholdedRelu LRN Hardmax Round IsNaN
IsInf Shrink QuantizeLinear DequantizeLinear CumSum Neg Abs Floor Ceil Not Identity Sign LpNormalization
MeanVarianceNormalization SimplifiedLayerNormalization FastGelu BiasGelu QuickGelu""".split())
_VARIADIC = {"Min": _min, "Max": _max, "Sum": lambda a, b: a + b, "Mean": None}
CONV_LIKE = frozenset({"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "FusedConv",
                       "ConvTranspose", "NhwcConv", "NhwcFusedConv"})
#: Ops whose rules never read their inputs' values.
_NO_VALUES = CONV_LIKE | {"MatMul", "Gemm", "PRelu", "BatchNormalization", "InstanceNormalization",
                          "LayerNormalization", "GroupNormalization", "GlobalAveragePool", "GlobalMaxPool"}


# ---- the walk -------------------------------------------------------------------------------------------
class _Walk:
    def __init__(self, opset: int, alias: dict):
        self.opset = opset
        self.alias = alias  # onnx's dim name → the dim found for it
        self.undecided: list[tuple[str, str, list[str], list[str]]] = []  # (graph path, If node, inputs whose values
        # its condition reads, inputs whose shape alone it reads)
        self.envs: dict[str, dict] = {}  # graph path → tensor → Val

    def graph(self, cg, env: dict, parent_env: "dict | None") -> None:
        nodes, shapes = cg.graph._node, cg.shapes
        for nid in cg.topological_order():
            data = nodes[nid]
            node = data["proto"]
            op = data["op_type"]
            want = op not in _NO_VALUES  # a conv's weights are never read as values
            ins = None
            if op in _SHAPE_ONLY and not data["subgraphs"]:  # fast path: onnx's static shapes are the answer...
                infos = [shapes.get(t) for t in node.output if t]
                if all(i is not None and i.shape is not None and all(type(d) is int for d in i.shape) for i in infos):
                    if op in _VALUE_RULES:  # ...unless a value comes in that the op's rule carries through
                        ins = [self.get(cg, env, parent_env, t) if t else None for t in node.input]
                    if ins is None or all(v is None or v.value is None for v in ins):
                        for t, i in zip((t for t in node.output if t), infos):
                            env[t] = Val(i.elem_type, i.shape)
                        continue
            if ins is None:
                ins = [self.get(cg, env, parent_env, t, want) if t else None for t in node.input]
            outs = None
            try:
                if data["subgraphs"]:
                    outs = self.control(cg, nid, data, ins, env, parent_env)
                else:
                    outs = self.op(node.op_type, data["attrs"], ins, len(node.output), conv_op(data))
            except (ArithmeticError, IndexError, KeyError, TypeError, ValueError):  # a malformed node: onnx's shapes
                outs = None
            for j, t in enumerate(node.output):
                if t:
                    mine = outs[j] if outs is not None and j < len(outs) else None
                    env[t] = self.merge(cg, t, mine, data)

    def get(self, cg, env, parent_env, t: str, want: bool = True) -> Val:
        """What is known of ``t``; an initializer's value is read once a consumer may use it (``want``)."""
        v = env.get(t)
        if v is None and parent_env is not None:
            v = parent_env.get(t)
        if v is None:
            g = cg
            while t in g._outer and g.parent is not None:  # an outer initializer no op out there read yet
                g = g.parent
            init = g.initializer(t)
            if init is not None:
                n = math.prod(init.dims)
                if not want:
                    return Val(init.data_type, tuple(init.dims))  # not cached: a later reader may want the value
                small = SMALL_FLOAT if init.data_type in _FLOAT_TYPES else SMALL
                value = _init_value(init) if n <= small and not init.external_data else None
                v = Val(init.data_type, tuple(init.dims), value)
            else:
                v = self.merge(cg, t, None, None)
            env[t] = v
        return v

    def onnx_dims(self, shape) -> tuple | None:
        if shape is None:
            return None
        return tuple(d if isinstance(d, int) else self.alias.get(d) if isinstance(d, str) else d for d in shape)

    def merge(self, cg, t: str, mine: "Val | None", data) -> Val:
        """What the rules found for ``t``, completed by onnx's inference (dim by dim), onnx's names learnt."""
        info = cg.shape_info(t)
        elem = info.elem_type if info is not None and info.elem_type else (mine.elem if mine else 0)
        theirs = info.shape if info is not None else None
        if mine is None or mine.shape is None:
            shape = self.onnx_dims(theirs)
            if mine is not None and mine.value is not None and shape is not None:
                return Val(elem, shape, mine.value)
            return Val(elem, shape, None)
        shape = mine.shape
        if theirs is not None and len(theirs) == len(shape):
            merged = []
            for m, o in zip(shape, theirs):
                if isinstance(o, str) and m is not None and o not in self.alias:
                    self.alias[o] = m
                merged.append(m if m is not None else (o if isinstance(o, int) else self.alias.get(o)))
            shape = tuple(merged)
        return Val(elem or mine.elem, shape, mine.value)

    # ---- If / Loop / Scan ----
    def control(self, cg, nid, data, ins, env, parent_env):
        op, subs, attrs = data["op_type"], data["subgraphs"], data["attrs"]
        scope = ChainMap(env, parent_env) if parent_env is not None else env  # what the bodies see (no copy)
        if op == "If":
            cond = ins[0].value if ins and ins[0] is not None else None
            c = cond.reshape(-1)[0] if cond is not None and cond.size == 1 else None
            taken = None if c is None or isinstance(c, Expr) else bool(c)
            results = {}
            for key in ("then_branch", "else_branch"):
                body = subs.get(key)
                if body is None:
                    continue
                body.taken = None if taken is None else taken == (key == "then_branch")
                results[key] = self.body(body, {}, scope)
            if taken is None:
                self.undecided.append((cg.path, nid, *_inputs_read(cg, data["proto"].input[0])))
                outs = [_join(a, b) for a, b in zip(*results.values())] if len(results) == 2 else None
            else:
                outs = results.get("then_branch" if taken else "else_branch")
            return outs
        if op == "Loop":
            body = subs.get("body")
            if body is None:
                return None
            carried = ins[2:]
            seeds = [Val(onnx.TensorProto.INT64, ()), Val(_BOOL, ())] + [Val(v.elem, v.shape) for v in carried]
            outs = self.body(body, dict(zip(_io_names(body, "input"), seeds)), scope)
            trip = ins[0].value if ins and ins[0] is not None else None
            n = _dim(trip.reshape(-1)[0]) if trip is not None and trip.size == 1 and len(ins) > 1 and not ins[1] else None
            k = len(carried)
            final = [_join(Val(o.elem, o.shape), Val(c.elem, c.shape)) for o, c in zip(outs[1:1 + k], carried)]
            scans = [Val(o.elem, None if o.shape is None else (n, *o.shape)) for o in outs[1 + k:]]
            return final + scans
        if op == "Scan":
            body = subs.get("body")
            m = int(attrs.get("num_scan_inputs", 0))
            if body is None or self.opset < 9:
                return None
            states, seqs = ins[:len(ins) - m], ins[len(ins) - m:]
            in_axes = list(attrs.get("scan_input_axes", [0] * m))
            slices, length = [], None
            for v, ax in zip(seqs, in_axes):
                if v is None or v.shape is None:
                    slices.append(Val(v.elem if v else 0, None))
                    continue
                ax = ax % len(v.shape)
                length = length if length is not None else v.shape[ax]
                slices.append(Val(v.elem, v.shape[:ax] + v.shape[ax + 1:]))
            seeds = [Val(v.elem, v.shape) for v in states] + slices
            outs = self.body(body, dict(zip(_io_names(body, "input"), seeds)), scope)
            k = len(states)
            out_axes = list(attrs.get("scan_output_axes", [0] * (len(outs) - k)))
            scans = []
            for o, ax in zip(outs[k:], out_axes):
                if o.shape is None:
                    scans.append(Val(o.elem, None))
                else:
                    ax = ax % (len(o.shape) + 1)
                    scans.append(Val(o.elem, o.shape[:ax] + (length,) + o.shape[ax:]))
            return [_join(o, s) for o, s in zip(outs[:k], states)] + scans
        return None

    def body(self, body, seeds: dict, scope: dict) -> list[Val]:
        env = self.envs[body.path] = {}
        for t, v in seeds.items():
            env[t] = self.merge(body, t, v, None)
        self.graph(body, env, scope)
        return [env.get(t) or self.merge(body, t, None, None) for t in _io_names(body, "output")]

    # ---- one op ----
    def op(self, op: str, attrs: dict, ins: list, n_out: int, conv) -> "list[Val | None] | None":
        x = ins[0] if ins else None
        shape = x.shape if x is not None else None
        if op in SAME_SHAPE:
            f: Callable | None = _UNARY_VALUES.get(op)
            value = _elementwise(f, x.value) if f is not None and x is not None and x.value is not None else None
            return [Val(0, shape, value), *[Val(_BOOL, shape)] * (op == "Dropout" and n_out > 1)]
        if op in _BINARY or op == "Div":
            a, b = ins[0], ins[1]
            if a is None or b is None:
                return None
            out = broadcast(a.shape, b.shape)
            value = None
            if a.value is not None and b.value is not None:
                if op == "Div":
                    f = _trunc_div if a.elem in _INT_TYPES else (lambda p, q: p / q if isinstance(p, Expr) else Fraction(p) / q)
                else:
                    f = _BINARY[op]
                value = _elementwise(f, a.value, b.value)
            return [Val(_BOOL if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
                        else a.elem, out, value)]
        if op in _VARIADIC:
            vals = [v for v in ins if v is not None]
            out = broadcast(*[v.shape for v in vals])
            value = None
            f = _VARIADIC[op]
            if f is not None and all(v.value is not None for v in vals):
                value = vals[0].value
                for v in vals[1:]:
                    value = _elementwise(f, value, v.value) if value is not None else None
            return [Val(0, out, value)]
        if op == "Where":
            c, a, b = ins
            out = broadcast(c.shape, a.shape, b.shape)
            value = None
            if c.value is not None and a.value is not None and b.value is not None:
                value = _elementwise(lambda k, p, q: p if _truth(k) else q, c.value, a.value, b.value)
            return [Val(0, out, value)]
        if op == "PRelu":
            return [Val(0, broadcast(ins[0].shape, ins[1].shape))]
        handler = _HANDLERS.get(op)
        if handler is not None:
            return handler(self, attrs, ins, n_out)
        if conv is not None or op in CONV_LIKE:
            return [_conv_like(op, attrs, ins, conv)]
        if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
            return [Val(0, None if shape is None else (*shape[:2], *(1,) * (len(shape) - 2)))]
        return None


def _init_value(t: onnx.TensorProto) -> np.ndarray | None:
    """A small initializer's value; None when onnx cannot read it (a type it does not know, bad data)."""
    try:
        return array_value(numpy_helper.to_array(t))
    except (KeyError, TypeError, ValueError):
        return None


def _truth(k):
    if isinstance(k, Expr):
        raise ValueError("undecided")
    return bool(k)


def _join(a: "Val | None", b: "Val | None") -> Val:
    """What two possible values of a tensor (the branches of an If) have in common."""
    if a is None or b is None:
        return a or b or Val(0, None)
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return Val(a.elem or b.elem, None)
    return Val(a.elem or b.elem, tuple(x if x == y else None for x, y in zip(a.shape, b.shape)))


def _io_names(cg, kind: str) -> list[str]:
    nodes = [d for d in cg.graph._node.values() if d["kind"] == kind]
    nodes.sort(key=lambda d: d["order"])
    return [d["proto"].name for d in nodes]


def _inputs_read(cg, tensor: str, only_shape: bool = False) -> tuple[list[str], list[str]]:
    """The graph inputs ``tensor`` is computed from (through enclosing graphs), in the main graph's order:
    those whose values it reads, and those whose shape alone it reads (through Shape or Size)."""
    seen, stack = {(tensor, only_shape)}, [(tensor, only_shape)]
    values: set[str] = set()
    shapes: set[str] = set()
    g = cg
    while stack:
        t, shape = stack.pop()
        src = g.producer(t)
        if src is None:
            continue
        d = g.graph._node[src]
        if d["kind"] == "input":
            if g.parent is None:
                (shapes if shape else values).add(t)
        elif d["kind"] == "outer" and g.parent is not None:
            v, s = _inputs_read(g.parent, t, shape)
            values.update(v)
            shapes.update(s)
        elif d["kind"] == "op":
            shape = shape or d["op_type"] in ("Shape", "Size")
            for u in d["proto"].input:
                if u and (u, shape) not in seen:
                    seen.add((u, shape))
                    stack.append((u, shape))
    return sorted(values), sorted(shapes - values)


# ---- shape rules ---------------------------------------------------------------------------------------
def _shaped(rule):
    """A rule that needs its first input's shape, called with that input and its rank; without it, None
    (onnx's shape is taken)."""
    def apply(w, attrs, ins, n):
        x = ins[0] if ins else None
        return None if x is None or x.shape is None else rule(w, attrs, ins, n, x, len(x.shape))
    return apply


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _shape_op(w, attrs, ins, n):
    shape = ins[0].shape
    if shape is None:
        return [Val(onnx.TensorProto.INT64, None)]
    r = len(shape)
    start = _axis(int(attrs.get("start", 0)), r)
    end = attrs.get("end")
    end = r if end is None else _axis(int(end), r)
    dims = list(shape)[max(0, min(start, r)):max(0, min(end, r))]
    value = np.empty(len(dims), dtype=object)
    value[:] = dims
    return [Val(onnx.TensorProto.INT64, (len(dims),), value)]


def _size(w, attrs, ins, n):
    v = _numel(ins[0].shape)
    return [Val(onnx.TensorProto.INT64, (), None if v is None else _obj(v))]


def _constant(w, attrs, ins, n):
    if "value" in attrs:
        a = numpy_helper.to_array(attrs["value"])
        return [Val(attrs["value"].data_type, tuple(a.shape), array_value(a))]
    for key, elem in (("value_int", onnx.TensorProto.INT64), ("value_float", onnx.TensorProto.FLOAT)):
        if key in attrs:
            return [Val(elem, (), array_value(np.array(attrs[key])))]
    for key, elem in (("value_ints", onnx.TensorProto.INT64), ("value_floats", onnx.TensorProto.FLOAT)):
        if key in attrs:
            a = np.array(attrs[key])
            return [Val(elem, a.shape, array_value(a))]
    return None


def _filled(shape, x) -> np.ndarray | None:
    n = _numel(shape)
    if type(n) is not int or n > SMALL or any(type(d) is not int for d in shape):
        return None
    out = np.empty(shape, dtype=object)
    out.fill(x)
    return out


def _constant_of_shape(w, attrs, ins, n):
    dims = _ints(ins[0].value)
    shape = tuple(dims) if dims is not None else None
    t = attrs.get("value")
    fill = array_value(numpy_helper.to_array(t)).reshape(-1)[0] if t is not None else 0
    return [Val(t.data_type if t is not None else onnx.TensorProto.FLOAT, shape,
                _filled(shape, fill) if shape is not None else None)]


def _cast(w, attrs, ins, n):
    x, to = ins[0], int(attrs.get("to", 0))
    value = None
    if x.value is not None:
        f = _to_int if to in _INT_TYPES else (lambda a: bool(_truth(a))) if to == _BOOL else (lambda a: a)
        value = _elementwise(f, x.value)
    return [Val(to, x.shape, value)]


def _gather(w, attrs, ins, n):
    data, idx = ins[0], ins[1]
    if data.shape is None or idx.shape is None:
        return None
    r = len(data.shape)
    axis = _axis(int(attrs.get("axis", 0)), r)
    shape = data.shape[:axis] + idx.shape + data.shape[axis + 1:]
    value = None
    ids = _consts(idx.value)
    if data.value is not None and ids is not None:
        size = data.shape[axis]
        ids = [i + size if i < 0 else i for i in ids]
        value = _obj(np.take(data.value, np.array(ids, dtype=np.int64).reshape(idx.shape), axis=axis))
    return [Val(data.elem, shape, value)]


def _slice(w, attrs, ins, n):
    data = ins[0]
    if data.shape is None:
        return None
    r = len(data.shape)
    if w.opset >= 10:
        starts, ends = _consts(ins[1].value), _consts(ins[2].value)
        axes = _consts(ins[3].value) if len(ins) > 3 and ins[3] is not None else list(range(len(starts or ())))
        steps = _consts(ins[4].value) if len(ins) > 4 and ins[4] is not None else [1] * len(starts or ())
    else:
        starts, ends = list(attrs.get("starts", [])), list(attrs.get("ends", []))
        axes, steps = list(attrs.get("axes", range(len(starts)))), [1] * len(starts)
    if starts is None or ends is None or axes is None or steps is None:
        return [Val(data.elem, None)] if any(v is None for v in (starts, ends)) else None
    shape, index = list(data.shape), [slice(None)] * r
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, r)
        d = shape[a]
        index[a] = slice(s, e, st)
        if type(d) is int:
            shape[a] = len(range(*slice(s, e, st).indices(d)))
        elif d is not None and st > 0:
            lo = d + s if s < 0 else s
            hi = d if e >= _BIG else d + e if e < 0 else e
            span = hi - lo
            shape[a] = span if st == 1 else (span + st - 1) // st
            if not isinstance(shape[a], Expr) and shape[a] < 0:
                shape[a] = 0
        else:
            shape[a] = None
    value = data.value[tuple(index)] if data.value is not None else None
    return [Val(data.elem, tuple(shape), value)]


def _concat(w, attrs, ins, n):
    vals = [v for v in ins if v is not None]
    if any(v.shape is None for v in vals) or not vals:
        return None
    r = len(vals[0].shape)
    axis = _axis(int(attrs.get("axis", 0)), r)
    shape = list(vals[0].shape)
    total = 0
    for v in vals:
        d = v.shape[axis]
        total = None if total is None or d is None else total + d
    for j in range(r):
        if j != axis:
            for v in vals[1:]:
                shape[j] = _bdim(shape[j], v.shape[j]) if shape[j] != v.shape[j] else shape[j]
    shape[axis] = total
    value = None
    if all(v.value is not None for v in vals):
        value = np.concatenate([v.value for v in vals], axis=axis)
    return [Val(vals[0].elem, tuple(shape), value)]


def _axes(w, attrs, ins):
    if w.opset >= 13 and len(ins) > 1:
        return _consts(ins[1].value) if ins[1] is not None else None
    a = attrs.get("axes")
    return list(a) if a is not None else None


@_shaped
def _squeeze(w, attrs, ins, n, x: _Shaped, r: int):
    axes = _axes(w, attrs, ins)
    if axes is None:
        if (w.opset >= 13 and len(ins) > 1 and ins[1] is not None) or not all(is_dim(d) for d in x.shape):
            return None
        axes = [j for j, d in enumerate(x.shape) if d == 1]
    drop = {_axis(a, r) for a in axes}
    shape = tuple(d for j, d in enumerate(x.shape) if j not in drop)
    return [Val(x.elem, shape, x.value.reshape(shape) if x.value is not None else None)]


def _unsqueeze(w, attrs, ins, n):
    x = ins[0]
    axes = _axes(w, attrs, ins)
    if x.shape is None or axes is None:
        return None
    r = len(x.shape) + len(axes)
    add = sorted(_axis(a, r) for a in axes)
    shape = list(x.shape)
    for a in add:
        shape.insert(a, 1)
    shape = tuple(shape)
    return [Val(x.elem, shape, x.value.reshape(shape) if x.value is not None else None)]


def _reshape_to(x: Val, target: list, allowzero: bool = False) -> tuple | None:
    out = []
    for j, t in enumerate(target):
        if t == 0 and not allowzero:
            t = x.shape[j] if x.shape is not None and j < len(x.shape) else None
        out.append(t)
    if sum(1 for t in out if type(t) is int and t == -1) == 1:
        k = next(j for j, t in enumerate(out) if type(t) is int and t == -1)
        rest = _numel([t for j, t in enumerate(out) if j != k])
        total = _numel(x.shape)
        out[k] = None
        if rest is not None and total is not None and rest != 0:
            q = total // rest if isinstance(total, Expr) else total // rest if isinstance(rest, int) else None
            if q is not NotImplemented and q is not None:
                out[k] = q
    return tuple(out)


def _reshape(w, attrs, ins, n):
    x = ins[0]
    target = _ints(ins[1].value) if w.opset >= 5 else list(attrs.get("shape", []))
    if target is None:
        return None
    shape = _reshape_to(x, target, bool(attrs.get("allowzero", 0)))
    value = None
    if x.value is not None and shape is not None and all(type(d) is int for d in shape):
        value = x.value.reshape(shape)
    return [Val(x.elem, shape, value)]


@_shaped
def _flatten(w, attrs, ins, n, x: _Shaped, r: int):
    axis = _axis(int(attrs.get("axis", 1)), r)
    shape = (_numel(x.shape[:axis]), _numel(x.shape[axis:]))
    value = x.value.reshape(shape) if x.value is not None and all(type(d) is int for d in shape) else None
    return [Val(x.elem, shape, value)]


def _expand(w, attrs, ins, n):
    x, target = ins[0], _ints(ins[1].value)
    if target is None:
        return None
    shape = broadcast(x.shape, tuple(target)) if x.shape is not None else None
    value = None
    if x.value is not None and shape is not None and all(type(d) is int for d in shape) and _numel(shape) <= SMALL:
        value = np.broadcast_to(x.value, shape).copy()
    return [Val(x.elem, shape, value)]


def _tile(w, attrs, ins, n):
    x, reps = ins[0], _ints(ins[1].value)
    if x.shape is None or reps is None:
        return None
    shape = tuple(None if d is None or k is None else d * k for d, k in zip(x.shape, reps))
    value = np.tile(x.value, reps) if x.value is not None and all(type(k) is int for k in reps) else None
    return [Val(x.elem, shape, value if value is None or value.size <= SMALL else None)]


def _range(w, attrs, ins, n):
    start, limit, delta = (_ints(v.value) if v.value is not None else None for v in ins)
    elem = ins[0].elem
    if start is None or limit is None or delta is None:
        return [Val(elem, (None,))]
    s, e, d = start[0], limit[0], delta[0]
    if s is None or e is None or type(d) is not int or d == 0:
        return [Val(elem, (None,))]
    count = (e - s + d - 1) // d if d > 0 else (s - e - d - 1) // (-d)
    if not isinstance(count, Expr):
        count = max(count, 0)
    value = None
    if type(count) is int and count <= SMALL and not isinstance(s, Expr):
        value = np.array([s + i * d for i in range(count)], dtype=object)
    return [Val(elem, (count,), value)]


@_shaped
def _transpose(w, attrs, ins, n, x: _Shaped, r: int):
    perm = attrs.get("perm") or list(range(r))[::-1]
    return [Val(x.elem, tuple(x.shape[p] for p in perm),
                np.transpose(x.value, perm) if x.value is not None else None)]


@_shaped
def _pad(w, attrs, ins, n, x: _Shaped, r: int):
    pads = _ints(ins[1].value) if w.opset >= 11 and len(ins) > 1 and ins[1] is not None else attrs.get("pads")
    if pads is None:
        return None
    axes = _consts(ins[3].value) if w.opset >= 18 and len(ins) > 3 and ins[3] is not None else list(range(r))
    if axes is None:
        return None
    shape = list(x.shape)
    k = len(axes)
    for j, a in enumerate(axes):
        a = _axis(a, r)
        b, e = pads[j], pads[j + k]
        shape[a] = None if shape[a] is None or b is None or e is None else shape[a] + b + e
    return [Val(x.elem, tuple(shape))]


@_shaped
def _resize(w, attrs, ins, n, x: _Shaped, r: int):
    if w.opset >= 11:
        scales = ins[2] if len(ins) > 2 else None
        sizes = ins[3] if len(ins) > 3 else None
    else:
        scales = ins[1] if len(ins) > 1 else None
        sizes = None
    axes = list(attrs.get("axes") or range(r))
    if attrs.get("keep_aspect_ratio_policy", b"stretch") not in (b"stretch", "stretch"):
        return None  # not_larger / not_smaller: onnx's inference decides
    shape = list(x.shape)
    if sizes is not None and sizes.shape != (0,):
        got = _ints(sizes.value)
        if got is None:
            return None
        for a, s in zip(axes, got):
            shape[_axis(a, r)] = s
        return [Val(x.elem, tuple(shape))]
    if scales is None:
        sc = attrs.get("scales")  # Upsample-7
        factors = [Fraction(float(s)) for s in sc] if sc is not None else None
    else:
        factors = list(scales.value.reshape(-1)) if scales.value is not None else None
    if factors is None:
        return None
    for a, f in zip(axes, factors):
        a = _axis(a, r)
        d = shape[a]
        shape[a] = None if d is None or f is None else _floor(d * Fraction(f))
    return [Val(x.elem, tuple(shape))]


@_shaped
def _split(w, attrs, ins, n, x: _Shaped, r: int):
    axis = _axis(int(attrs.get("axis", 0)), r)
    if w.opset >= 13:
        sizes = _ints(ins[1].value) if len(ins) > 1 and ins[1] is not None else None
        if len(ins) > 1 and ins[1] is not None and sizes is None:
            return None
    else:
        sizes = attrs.get("split")
    d = x.shape[axis]
    if not sizes:
        parts = int(attrs.get("num_outputs", n))
        if d is None:
            sizes = [None] * parts
        elif type(d) is int:
            each = -(-d // parts)
            sizes = [each] * (parts - 1) + [d - each * (parts - 1)]
        else:
            sizes = [d // parts] * parts
    out = []
    for s in sizes[:n]:
        shape = list(x.shape)
        shape[axis] = s
        out.append(Val(x.elem, tuple(shape)))
    return out


def _reduce(w, attrs, ins, n, op: str = "ReduceSum"):
    x = ins[0] if ins else None
    if x is None or x.shape is None:
        return None
    r = len(x.shape)
    axes = attrs.get("axes")
    if len(ins) > 1:  # ReduceSum-13, every Reduce-18
        if ins[1] is None:
            axes = None
        else:
            axes = _consts(ins[1].value)
            if axes is None:
                return None
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [Val(x.elem, x.shape)]
        axes = list(range(r))
    drop = {_axis(a, r) for a in axes}
    keep = int(attrs.get("keepdims", 1))
    shape = tuple(1 if j in drop else d for j, d in enumerate(x.shape) if keep or j not in drop)
    value = None
    f = _REDUCE_VALUES.get(op)
    if f is not None and x.value is not None and x.value.size and all(type(d) is int for d in shape):
        value = x.value
        for a in sorted(drop, reverse=True):  # fold each reduced axis pairwise, exactly (Exprs included)
            if value is None:
                break
            parts = [np.take(value, [k], axis=a) for k in range(value.shape[a])]
            value = parts[0]
            for p in parts[1:]:
                value = _elementwise(f, value, p) if value is not None else None
        value = value.reshape(shape) if value is not None else None
    return [Val(x.elem, shape, value)]


@_shaped
def _argmax(w, attrs, ins, n, x: _Shaped, r: int):
    axis = _axis(int(attrs.get("axis", 0)), r)
    keep = int(attrs.get("keepdims", 1))
    return [Val(onnx.TensorProto.INT64, tuple(1 if j == axis else d for j, d in enumerate(x.shape)
                                               if keep or j != axis))]


def _matmul(w, attrs, ins, n):
    a, b = ins[0].shape, ins[1].shape
    if a is None or b is None or not a or not b:
        return None
    a2 = a if len(a) > 1 else (1, *a)
    b2 = b if len(b) > 1 else (*b, 1)
    batch = broadcast(a2[:-2], b2[:-2])
    shape = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b) == 1:
        shape = shape[:-1]
    return [Val(ins[0].elem, shape)]


def _gemm(w, attrs, ins, n):
    a, b = ins[0].shape, ins[1].shape
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m = a[1] if attrs.get("transA", 0) else a[0]
    k = b[0] if attrs.get("transB", 0) else b[1]
    return [Val(ins[0].elem, (m, k))]


def _depth_to_space(w, attrs, ins, n, up=True):
    x = ins[0]
    if x.shape is None or len(x.shape) != 4:
        return None
    b = int(attrs["blocksize"])
    nb, c, h, wd = x.shape
    if up:
        shape = (nb, c // (b * b) if c is not None else None, _mul(h, b), _mul(wd, b))
    else:
        shape = (nb, _mul(c, b * b), h // b if h is not None else None, wd // b if wd is not None else None)
    return [Val(x.elem, shape)]


def _mul(d, k):
    return None if d is None else d * k


def _conv_like(op: str, attrs: dict, ins: list, conv) -> Val:
    """Output shape of a conv or pool from :mod:`convgraph.model.arithmetic` (Exprs for symbolic sizes)."""
    from . import arithmetic as ar

    x = ins[0]
    if x is None or x.shape is None or len(x.shape) < 3:
        return Val(0, None)
    channels_last = bool(conv is not None and conv.channels_last) or bool(attrs.get("channels_last", 0))
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    nd = len(spatial)
    kernel = attrs.get("kernel_shape")
    w = ins[conv.weight] if conv is not None and len(ins) > conv.weight else None
    if not kernel and w is not None and w.shape is not None and len(w.shape) == nd + 2:
        kernel = w.shape[2:]
    if not kernel or not all(type(k) is int for k in kernel):
        return Val(0, None)
    kernel = [int(k) for k in kernel]
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    pads = list(attrs.get("pads") or [])
    auto = attrs.get("auto_pad", "NOTSET")
    auto = (auto.decode() if isinstance(auto, bytes) else auto) or "NOTSET"
    if conv is not None and conv.transposed:
        _, out = ar.conv_transpose_geometry(spatial, kernel, strides, dilations, pads, auto,
                                            attrs.get("output_padding", ()), attrs.get("output_shape", ()))
    elif attrs.get("ceil_mode", 0):
        out = ar.pool_output_spatial_ceil(spatial, kernel, strides, dilations, pads, auto)
    else:
        out = ar.conv_output_spatial(spatial, kernel, strides, dilations, pads, auto)
    if conv is not None:
        ws = w.shape if w is not None else None
        group = int(attrs.get("group", 1))
        c = None if ws is None else (ws[1] * group if conv.transposed else ws[0])
    else:
        c = x.shape[-1] if channels_last else x.shape[1]
    shape = (x.shape[0], *out, c) if channels_last else (x.shape[0], c, *out)
    return Val(0, shape)


_REDUCE_VALUES = {"ReduceSum": lambda a, b: a + b, "ReduceProd": lambda a, b: a * b, "ReduceMin": _min,
                  "ReduceMax": _max}
#: Ops of the fast path below whose rules carry values: they take it only when no input has a value.
_VALUE_RULES = frozenset({"Transpose", "Flatten", *_REDUCE_VALUES})
_SHAPE_ONLY = _NO_VALUES | (SAME_SHAPE - set(_UNARY_VALUES)) | {
    "Transpose", "Resize", "Upsample", "Pad", "ReduceMean", "ReduceMax", "ReduceSum", "ArgMax", "ArgMin",
    "DepthToSpace", "SpaceToDepth", "Flatten", "Relu"}

_HANDLERS = {
    "Shape": _shape_op, "Size": _size, "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Cast": _cast,
    "Gather": _gather, "Slice": _slice, "Concat": _concat, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Reshape": _reshape, "Flatten": _flatten, "Expand": _expand, "Tile": _tile, "Range": _range,
    "Transpose": _transpose, "Pad": _pad, "Resize": _resize, "Upsample": _resize, "Split": _split,
    **{op: functools.partial(_reduce, op=op) for op in (
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceSumSquare")}, "ArgMax": _argmax, "ArgMin": _argmax, "MatMul": _matmul, "Gemm": _gemm,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": lambda w, attrs, ins, n: _depth_to_space(w, attrs, ins, n, up=False),
}


# ---- entry ----------------------------------------------------------------------------------------------
def propagate(cg, values: "dict[str, np.ndarray] | None" = None) -> None:
    """Propagate shapes and values over ``cg`` and its bodies (after onnx's inference filled ``cg.shapes``).

    ``values``: input name → array, the values of inputs fixed by the user (``--input-value``). Sets each
    graph's ``shapes`` (symbolic dims as :class:`~convgraph.model.expr.Expr`), the main graph's ``symbols``
    (identifier → ``{"input", "axis"}``) and ``undecided`` (If nodes whose condition is unknown: graph path,
    node id, the inputs whose values it is computed from, the inputs whose shape alone it reads), and each If
    body's ``taken``.
    """
    from .shapes import TensorInfo, real_inputs
    from .graph import refresh_edges

    opset = next((o.version for o in cg.model.opset_import if o.domain in ("", "ai.onnx")), 1)
    inputs = [vi.name for vi in real_inputs(cg.model.graph) if vi.name in cg._producer]
    declared = [(t, cg.shape(t)) for t in inputs]
    symbols, dims = input_symbols(declared)
    alias = {d: dims[(t, j)] for t, shape in declared for j, d in enumerate(shape or ())
             if isinstance(d, str) and any(ch.isalnum() for ch in d)}
    walk = _Walk(opset, alias)
    env: dict = {}
    for t, shape in declared:
        info = cg.shape_info(t)
        fixed = (values or {}).get(t)
        if fixed is not None:
            env[t] = Val(info.elem_type if info else 0, tuple(fixed.shape), array_value(np.asarray(fixed)))
        elif shape is not None:
            env[t] = Val(info.elem_type if info else 0,
                         tuple(d if isinstance(d, int) else dims[(t, j)] for j, d in enumerate(shape)))
    envs = {cg.path: env}
    walk.envs = envs
    walk.graph(cg, env, None)
    for g in cg.walk():
        genv = envs.get(g.path, {})
        for t, v in genv.items():
            old = g.shapes.get(t)
            if t in g._outer or (old is not None and old.shape == v.shape):
                continue
            g.shapes[t] = TensorInfo(old.elem_type if old is not None and old.elem_type else v.elem, v.shape)
        refresh_edges(g)
    cg.symbols = symbols
    cg.undecided = walk.undecided
