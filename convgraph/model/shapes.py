"""Tensor shapes: input shapes given by the user and onnx's shape inference.

:func:`convgraph.load` fixes dynamic input dims (``--input-shape``, :func:`parse_input_shape`), runs onnx's
shape inference (strict first, :func:`_infer`) on that copy and fills ``ConvGraph.shapes``
(:func:`convgraph.model.loader._collect_shapes`). Where inference gives up — a Reshape whose target is computed
at run time (Shape → Cast → Slice → Concat in models before opset 14), ops without an inference function — the
shapes stay unknown; :func:`convgraph.model.probe.probe_shapes` (``load(..., probe=True)``, ``convgraph analyze
--probe``) measures them by running the model once on generated inputs with those tensors exposed as outputs.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Iterator, NamedTuple

import numpy as np
import onnx
from onnx import helper

from .. import io as _io
from ..errors import UsageError
from ..io import first_line

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


def _elem_type(dtype: np.dtype) -> int:
    try:
        return helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, TypeError, ValueError):
        return 0

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
        if not all((isinstance(d, numbers.Integral) and not isinstance(d, bool) and 1 <= int(d) <= MAX_DIM)
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
        want: tuple[int, ...]
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
                                                                  for d, a in zip(shape, want))):
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
                                 f"({_dims_text(tuple(map(_dim, shape)))})")
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


def _undecided_warning(undecided: list, shapes: "dict | None" = None) -> str | None:
    """Which inputs decide the Ifs whose condition is unknown (both branches are then counted): a value
    (``--input-value``) or a dynamic dim (``--input-shape``) the condition is computed from. ``undecided`` is
    ``ConvGraph.undecided``; ``shapes`` the inputs' dims (name → dims), for the inputs whose shape it reads."""
    if not undecided:
        return None
    reads = sorted({t for _, _, ts, _ in undecided for t in ts})
    dynamic = [(t, (shapes or {}).get(t)) for t in sorted({t for _, _, _, ts in undecided for t in ts} - set(reads))]
    dynamic = [(t, s) for t, s in dynamic if s is None or not all(type(d) is int for d in s)]
    nodes = ", ".join(repr(nid) for _, nid, _, _ in undecided[:3]) + (" ..." if len(undecided) > 3 else "")
    said = [f"the condition reads input {', '.join(map(repr, reads))}"] if reads else []
    if dynamic:
        said.append(f"{'the condition' if not reads else 'and'} reads the dynamic shape of input "
                    f"{', '.join(repr(t) for t, _ in dynamic)}")
    hint = [f"--input-value {reads[0]}=V (input_values= in the API)"] if reads else []
    if dynamic:
        name, shape = dynamic[0]
        dims = "D0,D1,..." if shape is None else ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
        hint.append(f"--input-shape {name}={dims} (input_shapes=)")
    return (f"{len(undecided)} If node{'s' * (len(undecided) != 1)} ({nodes}) with a condition not known "
            f"statically: both branches are analyzed and counted" + "".join(", " + x for x in said)
            + (f"; {' or '.join(hint)} decides it" if hint else "; it is computed in the model, not from an input"))


# ---- onnx's shape inference -----------------------------------------------------------------------
def _infer(model: onnx.ModelProto, size: int | None = None, data: bytes | None = None) -> tuple[onnx.ModelProto, str | None]:
    """onnx shape inference, strict first; returns the inferred model and a warning when strict failed.

    ``size`` is the model's serialized size and ``data`` the serialized model, when known.
    """
    if (_io.byte_size(model) if size is None else size) > _io.PROTOBUF_LIMIT:
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
