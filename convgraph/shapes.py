"""Tensor shapes: input shapes given by the user, onnx's shape inference, and shapes measured with onnxruntime.

:func:`convgraph.load` fixes dynamic input dims (``--input-shape``, :func:`parse_input_shape`), runs onnx's
shape inference (strict first, :func:`_infer`) on that copy and fills ``ConvGraph.shapes``
(:func:`_collect_shapes`). Where inference gives up — a Reshape whose target is computed at run time
(Shape → Cast → Slice → Concat in models before opset 14), ops without an inference function — the shapes stay
unknown; :func:`probe_shapes` (``load(..., probe=True)``, ``convgraph analyze --probe``) measures them by
running the model once on generated inputs with those tensors exposed as outputs.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np
import onnx
from onnx import helper

from . import io as _io
from .errors import ModelError, UsageError
from .io import first_line

if TYPE_CHECKING:
    from .graph import ConvGraph

MAX_DIM = 2**31 - 1
_SHAPE_HELP = "expected NAME=D0,D1,... with positive integers, e.g. x=1,3,640,640"
#: Ops whose output shape depends on the values of their inputs, not only on their shapes.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})


class TensorInfo(NamedTuple):
    """Element type and shape of a tensor; dims are ints, symbolic names or None (immutable)."""

    elem_type: int
    shape: tuple | None

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def _tensor_info(t: onnx.TypeProto) -> TensorInfo | None:
    if not t.HasField("tensor_type"):
        return None
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    return TensorInfo(tt.elem_type, tuple(map(_dim, tt.shape.dim)))


def _dim(d: onnx.TensorShapeProto.Dimension) -> "int | str | None":
    """A dim as an int, a symbolic name or None; a negative dim_value (old exporters' "dynamic") is None."""
    if d.WhichOneof("value") == "dim_value":
        v = d.dim_value
        return v if v >= 0 else None
    return d.dim_param or None


# ---- input shapes ---------------------------------------------------------------------------------
def parse_input_shape(text: str) -> tuple[str, list]:
    """``"x=1,3,640,640"`` → ``("x", [1, 3, 640, 640])``; ``"x=1,3,H,W"`` names symbols; ``"sr="`` is rank 0."""
    name, sep, dims_text = str(text).rpartition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"bad --input-shape {text!r}: {_SHAPE_HELP}")
    parts = [p.strip() for p in re.split(r"[,×]", dims_text)] if dims_text.strip() else []
    if not all(re.fullmatch(r"[+-]?\d+", p) or p.isidentifier() for p in parts):
        raise UsageError(f"bad --input-shape {text!r}: {_SHAPE_HELP}")
    dims = [int(p) if p[-1].isdigit() else p for p in parts]
    if any(isinstance(d, int) and (d < 1 or d > MAX_DIM) for d in dims):
        raise UsageError(f"bad --input-shape {text!r}: dims must be integers between 1 and {MAX_DIM} or names")
    return name, dims


def _checked_input_shapes(input_shapes) -> dict[str, list]:
    """``input_shapes`` as ``{name: [dim, ...]}`` (dims: positive ints, or identifiers naming symbols);
    UsageError on anything else. ``[]`` is a rank-0 input."""
    if input_shapes is None:
        return {}
    if not hasattr(input_shapes, "items"):
        raise UsageError("input_shapes must map input names to dims, e.g. {'x': [1, 3, 640, 640]}")
    out = {}
    for name, dims in input_shapes.items():
        if isinstance(dims, str):
            dims = [dims]
        try:
            dims = list(dims)
        except TypeError:
            dims = [dims]
        if not all((isinstance(d, numbers.Integral) and not isinstance(d, bool) and 1 <= d <= MAX_DIM)
                   or (isinstance(d, str) and d.isidentifier()) for d in dims):
            raise UsageError(f"input shape for {name!r}: {dims!r} is not a list of integers between 1 and {MAX_DIM} "
                             f"or names")
        out[str(name)] = [d if isinstance(d, str) else int(d) for d in dims]
    return out


def parse_input_value(text: str) -> tuple[str, list]:
    """``"sr=16000"`` → ``("sr", [16000])``; ``"m=1,0.5"`` → ``("m", [1, 0.5])``; UsageError on anything else."""
    name, sep, values = str(text).rpartition("=")
    name = name.strip()
    try:
        parts = [float(p) if re.search(r"[.eE]|inf|nan", p.strip(), re.I) else int(p)
                 for p in values.split(",") if p.strip()]
    except ValueError:
        parts = None
    if not sep or not name or not parts:
        raise UsageError(f"bad --input-value {text!r}: expected NAME=V[,V...] with numbers, e.g. sample_rate=16000")
    return name, parts


def checked_input_values(model: onnx.ModelProto, values, input_shapes: dict | None = None) -> dict[str, np.ndarray]:
    """``values`` (input name → numbers or array) as arrays of each input's dtype and shape (rank 0 for one
    value of a rank-0 input; a vector for a 1-D one; else the input's shape, from the model or
    ``input_shapes``). UsageError (one line) for an unknown input or a count that does not fit."""
    if not values:
        return {}
    if not hasattr(values, "items"):
        raise UsageError("input_values must map input names to values, e.g. {'sample_rate': 16000}")
    inputs = {vi.name: vi for vi in real_inputs(model.graph)}
    out = {}
    for name, v in values.items():
        vi = inputs.get(name)
        if vi is None:
            raise UsageError(f"--input-value names {name!r}, not an input of the model "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        info = _tensor_info(vi.type)
        if info is None:
            raise UsageError(f"--input-value {name!r}: that input is not a tensor")
        try:
            dtype = helper.tensor_dtype_to_np_dtype(info.elem_type)
            arr = np.asarray(v).astype(dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--input-value {name!r}: {first_line(e)}") from None
        shape = (input_shapes or {}).get(name) or info.shape
        if shape is not None and len(shape) == 0:
            want = ()
        elif shape is not None and len(shape) == 1:
            want = (arr.size,)
        elif shape is not None and all(isinstance(d, int) for d in shape):
            want = tuple(shape)
        else:
            want = arr.shape
        if math.prod(want) != arr.size:
            raise UsageError(f"--input-value {name!r}: {arr.size} value{'s' * (arr.size != 1)} do not fill the input's "
                             f"shape {_dims_text(info.shape if shape is None else tuple(shape))}")
        arr = arr.reshape(want)
        if shape is not None and (len(shape) != arr.ndim or any(isinstance(d, int) and d != a
                                                                  for d, a in zip(shape, arr.shape))):
            raise UsageError(f"--input-value {name!r}: shape {list(arr.shape)} does not fit the input's "
                             f"{_dims_text(tuple(shape))}")
        out[str(name)] = arr
    return out


def real_inputs(g: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs of ``g`` that are not initializers (IR < 4 lists every initializer as an input too)."""
    inits = {t.name for t in g.initializer}
    return [vi for vi in g.input if vi.name not in inits]


def _fixed_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the given shapes (the model itself is left alone)."""
    if not input_shapes:
        return model
    inputs = {vi.name: vi for vi in real_inputs(model.graph)}
    unknown = sorted(set(input_shapes) - set(inputs))
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(map(repr, unknown))}, not an input of the model "
                         f"(inputs: {', '.join(inputs) or 'none'})")
    for name, dims in input_shapes.items():
        tt = inputs[name].type
        if not tt.HasField("tensor_type"):
            raise UsageError(f"--input-shape {name!r}: that input is not a tensor")
        if tt.tensor_type.HasField("shape"):
            shape = tt.tensor_type.shape.dim
            if len(shape) != len(dims):
                raise UsageError(f"--input-shape {name!r} has {len(dims)} dims, the model's input has {len(shape)} "
                                 f"({_dims_text(_tensor_info(tt).shape)})")
            for j, (dim, d) in enumerate(zip(shape, dims)):
                if dim.HasField("dim_value") and dim.dim_value >= 0 and dim.dim_value != d and not (
                        isinstance(d, str) and dim.dim_value == 0):
                    raise UsageError(f"--input-shape {name!r}: dim {j} is fixed to {dim.dim_value} in the model, not {d}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.Clear()
            for d in input_shapes[vi.name]:
                if isinstance(d, str):
                    shape.dim.add().dim_param = d
                else:
                    shape.dim.add().dim_value = d
    return m


def _dims_text(shape: tuple | None) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _dynamic_inputs(g: onnx.GraphProto) -> list[tuple[str, tuple | None]]:
    out = []
    for vi in real_inputs(g):
        info = _tensor_info(vi.type)
        if info is not None and not info.static:
            out.append((vi.name, info.shape))
    return out


def _fix_hint(dynamic: list[tuple[str, tuple | None]]) -> str:
    """How to fix the first dynamic input: ``--input-shape x=?,3,?,? with each ? an integer; input_shapes= ...``."""
    name, shape = dynamic[0]
    example = "D0,D1,..." if shape is None else ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
    return f"--input-shape {name}={example} with each ? an integer; input_shapes= in the API"


def _dynamic_warning(dynamic: list[tuple[str, tuple | None]], symbols: "dict | None" = None) -> str:
    listed = "; ".join(f"{name} {_dims_text(shape)}" for name, shape in dynamic)
    if symbols:
        named = ", ".join(f"{s} = {v['input']}[{v['axis']}]" for s, v in symbols.items())
        return (f"dynamic input dims left unset: {listed}; they are symbols ({named}) and the MACs that depend on "
                f"them formulas. Numbers: --input-shape NAME=D0,D1,... (here {_fix_hint(dynamic)})")
    return (f"dynamic input dims left unset: {listed}; shapes and MACs that depend on them are unknown. "
            f"Set them with --input-shape NAME=D0,D1,... (here {_fix_hint(dynamic)})")


def _undecided_warning(cg: "ConvGraph") -> str | None:
    """Which inputs decide the Ifs whose condition is unknown (both branches are then counted): a value
    (``--input-value``) or a dynamic dim (``--input-shape``) the condition is computed from."""
    if not cg.undecided:
        return None
    reads = sorted({t for _, _, ts, _ in cg.undecided for t in ts})
    dynamic = [(t, cg.shape(t)) for t in sorted({t for _, _, _, ts in cg.undecided for t in ts} - set(reads))]
    dynamic = [(t, s) for t, s in dynamic if s is None or not all(type(d) is int for d in s)]
    nodes = ", ".join(repr(nid) for _, nid, _, _ in cg.undecided[:3]) + (" ..." if len(cg.undecided) > 3 else "")
    said = [f"the condition reads input {', '.join(map(repr, reads))}"] if reads else []
    if dynamic:
        said.append(f"{'the condition' if not reads else 'and'} reads the dynamic shape of input "
                    f"{', '.join(repr(t) for t, _ in dynamic)}")
    hint = [f"--input-value {reads[0]}=V (input_values= in the API)"] if reads else []
    if dynamic:
        name, shape = dynamic[0]
        dims = "D0,D1,..." if shape is None else ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
        hint.append(f"--input-shape {name}={dims} (input_shapes=)")
    return (f"{len(cg.undecided)} If node{'s' * (len(cg.undecided) != 1)} ({nodes}) with a condition not known "
            f"statically: both branches are analyzed and counted" + "".join(", " + x for x in said)
            + (f"; {' or '.join(hint)} decides it" if hint else "; it is computed in the model, not from an input"))


# ---- onnx's shape inference -----------------------------------------------------------------------
def _infer(model: onnx.ModelProto, size: int | None = None, data: bytes | None = None) -> tuple[onnx.ModelProto, str | None]:
    """onnx shape inference, strict first; returns the inferred model and a warning when strict failed.

    ``size`` is the model's serialized size and ``data`` the serialized model, when known.
    """
    if (model.ByteSize() if size is None else size) > _io.PROTOBUF_LIMIT:
        return model, "model over 2 GB given in memory: shape inference skipped (load it from its file)"
    source = model if data is None else data
    try:
        return onnx.shape_inference.infer_shapes(source, check_type=True, strict_mode=True, data_prop=True), None
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as e:
        msg = first_line(e)
    try:
        inferred = onnx.shape_inference.infer_shapes(source, data_prop=True)
        return inferred, f"strict shape inference failed ({msg}); the shapes onnx could infer are used, others are unknown"
    except Exception as e:  # noqa: BLE001 - any inference crash becomes a warning, the graph is still usable
        return model, f"shape inference failed ({first_line(e)}); shapes unknown"


def _sub_protos(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(key, body) of each subgraph attribute: ``"then_branch"``, or ``"name[j]"`` for GRAPHS."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for j, g in enumerate(a.graphs):
                yield f"{a.name}[{j}]", g


def _collect_shapes(cg: "ConvGraph", g: onnx.GraphProto, _types: "dict | None" = None) -> None:
    """Fill ``cg.shapes`` (and its edges' ``info``) from the inferred ``g``, subgraphs included."""
    types = {} if _types is None else _types  # serialized TypeProto -> its TensorInfo: most tensors share a few
    shapes = cg.shapes
    for vis in (g.input, g.output, g.value_info):
        for vi in vis:
            key = vi.type.SerializeToString()
            info = types.get(key, types)
            if info is types:
                info = types[key] = _tensor_info(vi.type)
            if info is not None:
                shapes[vi.name] = info
    for t in g.initializer:
        if t.name not in shapes:
            shapes[t.name] = TensorInfo(t.data_type, tuple(t.dims))
    for s in g.sparse_initializer:
        shapes.setdefault(s.values.name, TensorInfo(s.values.data_type, tuple(s.dims)))
    G = cg.graph
    data = G._node  # networkx's node dict: a plain lookup (G.nodes[n] builds a view call per node)
    for nid, node in zip(cg._op_ids, g.node):  # same order: the view was built from this graph
        subs = data[nid]["subgraphs"]
        if subs:
            for key, body in _sub_protos(node):
                _collect_shapes(subs[key], body, types)
    # the edges' info is set by convgraph.propagate.propagate, which runs next and completes these shapes


def refresh_edges(cg: "ConvGraph") -> None:
    """Set every edge's ``info`` of ``cg`` (not its bodies) from ``cg.shapes``."""
    shapes, info = cg.shapes, cg.shape_info
    for nbrs in cg.graph._succ.values():  # every edge's data dict, without networkx's per-edge view tuples
        for keys in nbrs.values():
            for d in keys.values():
                t = d["tensor"]
                d["info"] = shapes[t] if t in shapes else info(t)


# ---- shapes measured with onnxruntime -------------------------------------------------------------
def unknown_tensors(cg: "ConvGraph") -> list[str]:
    """Tensors made by the ops of ``cg`` whose shapes are not all ints (unknown, or symbolic dims), in op order."""
    out, nodes, info = [], cg.graph._node, cg.shape_info
    for nid in cg.topological_order():
        for t in nodes[nid]["proto"].output:
            if t:
                i = info(t)
                if i is None or not i.static:
                    out.append(t)
    return out


def probe_shapes(cg: "ConvGraph", tensors: "list[str] | None" = None, *, seed: int = 0,
                 provider: str = "cpu") -> dict[str, tuple[int, ...]]:
    """Measure tensor shapes by running the model once on generated inputs with onnxruntime; fill ``cg.shapes``.

    ``tensors``: the main-graph tensors to measure; default every tensor made by a main-graph op whose
    shape onnx's inference left unknown or symbolic. With nothing to measure it returns ``{}`` at once
    (no onnxruntime session). Otherwise every input of the model needs a concrete shape (static, or
    fixed by ``input_shapes`` at load). Inputs are random (seeded, of each input's dtype, see
    :func:`convgraph.inputs.random_inputs`); the measured shapes go into ``cg.shapes`` and the edges'
    ``info``, their names into ``cg.measured``, and one warning (``cg.warnings``) says what was measured
    on which inputs. Only main-graph tensors can be exposed as outputs: tensors inside If/Loop/Scan
    bodies keep their unknown shapes (counted in the warning). A shape computed from the input's values
    rather than its shape (after NonZero, NonMaxSuppression...) holds for that generated input only. The
    exposed tensors are all held at once after the run: memory up to the sum of their sizes.

    Returns tensor → measured shape. UsageError (one line) when onnxruntime is missing, an input shape
    is not concrete, or a name is not a main-graph tensor.
    """
    if cg.parent is not None:
        raise UsageError("probe_shapes() takes the main graph: onnxruntime cannot expose a subgraph's tensors")
    default = tensors is None
    names = unknown_tensors(cg) if default else _checked_tensors(cg, tensors)
    inner = sum(len(unknown_tensors(g)) for g in cg.walk() if g is not cg) if default else 0
    if not names:
        if inner:
            cg.warnings.append(_probe_warning(cg, {}, [], inner, {}, seed))
        return {}
    from .inputs import input_specs, random_inputs
    from .runtime import create_session, expose_tensors, ort, run

    try:
        ort()
    except UsageError as e:
        raise UsageError(f"--probe: {e}") from None
    model = cg.to_model() if cg.dirty else cg.model
    specs = input_specs(model)
    specs = [s for s in specs if s.name not in cg.input_values]  # the fixed values are fed as they are
    given = {s.name: cg.shape(s.name) for s in specs}
    dynamic = [(n, s) for n, s in given.items() if s is None or not all(type(d) is int for d in s)]
    if dynamic:
        listed = "; ".join(f"{n} {_dims_text(s)}" for n, s in dynamic)
        raise UsageError(f"--probe runs the model, so every input needs a concrete shape; dynamic: {listed}. "
                         f"Set {'them' if len(dynamic) > 1 else 'it'} with {_fix_hint(dynamic)}")
    feeds = {**random_inputs(specs, seed=seed, input_shapes=given)[0], **cg.input_values}
    try:
        # one run: graph optimizations would cost more session time than they save; onnxruntime's own error
        # log stays silent (its error comes back as one line)
        session = create_session(expose_tensors(model, names, cg.shapes), provider=provider, opt_level="disable",
                                 quiet=True)
        values = run(session, feeds, names)
    except ModelError as e:
        steering = sorted({t for _, _, ts, _ in cg.undecided for t in ts} - set(cg.input_values))
        hint = (f"; the model branches on input {', '.join(map(repr, steering))}: a random value may take the wrong "
                f"branch, --input-value {steering[0]}=V fixes it" if steering else "")
        raise ModelError(f"--probe: {e}{hint}") from None
    measured: dict[str, TensorInfo] = {}
    conflicts: dict[str, tuple] = {}
    for t, v in zip(names, values):
        if not isinstance(v, np.ndarray):  # a sequence, map or optional: no tensor shape to record
            continue
        shape = tuple(int(d) for d in v.shape)
        old = cg.shapes.get(t)
        if old is not None and old.shape is not None and (
                len(old.shape) != len(shape) or any(isinstance(a, int) and a != b for a, b in zip(old.shape, shape))):
            conflicts[t] = old.shape
        measured[t] = TensorInfo(old.elem_type if old is not None and old.elem_type else _elem_type(v.dtype), shape)
    _store(cg, measured)
    note = _probe_warning(cg, measured, [s.name for s in specs] + list(cg.input_values), inner, conflicts, seed)
    if note:
        cg.warnings.append(note)
    return {t: i.shape for t, i in measured.items()}


def _checked_tensors(cg: "ConvGraph", tensors) -> list[str]:
    """The names asked for, deduplicated; UsageError for one that is not a tensor made in the main graph."""
    names = list(dict.fromkeys(str(t) for t in tensors))
    bad = [t for t in names if cg.producer(t) is None]
    if bad:
        inside = next((g.path for g in cg.walk() if g is not cg and g.producer(bad[0]) is not None
                       and bad[0] not in g.outer_refs()), None)
        where = (f"it is inside the subgraph {inside}: onnxruntime can only expose main-graph tensors" if inside
                 else "no such tensor in the main graph")
        raise UsageError(f"probe_shapes(): cannot measure {bad[0]!r}: {where}")
    return names


def _elem_type(dtype: np.dtype) -> int:
    try:
        return helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, TypeError, ValueError):
        return 0


def _store(cg: "ConvGraph", measured: dict[str, TensorInfo]) -> None:
    """Put measured shapes into ``cg.shapes``, ``cg.measured`` and the info of every edge carrying them."""
    cg.shapes.update(measured)
    cg.measured.update(measured)
    for t, info in measured.items():
        src = cg.producer(t)
        for keys in cg.graph._succ[src].values():  # networkx's adjacency: {reader: {(tensor, slot): data}}
            for key, d in keys.items():
                if key[0] == t:
                    d["info"] = info
    for g in cg.walk():  # bodies reading a measured tensor see it through their "outer:" node
        if g is cg:
            continue
        for t in g._outer.keys() & measured.keys():
            for keys in g.graph._succ[g._outer[t]].values():
                for d in keys.values():
                    d["info"] = measured[t]


def _probe_warning(cg: "ConvGraph", measured: dict[str, TensorInfo], inputs: list[str], inner: int,
                   conflicts: dict[str, tuple], seed: int) -> str:
    parts = []
    if measured:
        fed = ", ".join(f"{n} {_dims_text(cg.shape(n))}" for n in inputs)
        ops = sorted({d["op_type"] for g in cg.walk() for d in g.graph._node.values()
                      if d["kind"] == "op" and d["op_type"] in DATA_DEPENDENT_OPS})
        parts.append(f"--probe ran the model once on generated inputs ({fed}; seed {seed}) and measured the shapes of "
                     f"{len(measured)} tensor{'s' * (len(measured) != 1)} onnx's shape inference could not follow: they "
                     f"hold for inputs of these shapes, but a shape computed from the input's values rather than its "
                     f"shape holds for this generated input only"
                     + (f" (this model has {', '.join(ops)})" if ops else ""))
    if conflicts:
        t, old = next(iter(conflicts.items()))
        parts.append(f"{len(conflicts)} measured shape{'s' * (len(conflicts) != 1)} disagree with onnx's inference "
                     f"(e.g. {t!r}: inferred {_dims_text(old)}, measured {_dims_text(measured[t].shape)}); "
                     f"the measured ones are used")
    if inner:
        parts.append(f"{inner} tensor{'s' * (inner != 1)} inside If/Loop/Scan bodies keep unknown shapes: onnxruntime "
                     f"can only expose main-graph tensors")
    return "; ".join(parts)
