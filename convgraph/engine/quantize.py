"""int8 through onnxruntime's own quantizer: activation ranges calibrated on data, and the nodes of one rewrite
turned into QDQ form (QuantizeLinear/DequantizeLinear around float ops), which onnxruntime runs as int8 kernels
(QLinearConv) after its graph optimizer.

``onnxruntime.quantization`` does the quantizing: its calibrators (MinMax, Percentile, Entropy) turn the
activations seen on the calibration data into ranges, and ``quantize_static`` (QDQ format, per-channel symmetric
int8 weights, uint8 activations, int32 biases) writes the quantized nodes. What this module adds around it:

* a region at a time: the nodes one rewrite put in, cut out as a standalone model and quantized alone, so each
  quantized conv is a change of its own (checked alone, reported alone, spliced back under the tensor names the
  rest of the graph reads);
* scales a graph already has are kept: a region input that a DequantizeLinear makes, or an output that only
  QuantizeLinears read, is quantized with that DequantizeLinear's (QuantizeLinear's) scale and zero point, and the
  QuantizeLinear → DequantizeLinear pair the quantizer put there is dropped again, so a requantized rewrite of a
  QDQ conv sits between the original's own activation quantization; data-movement ops (Concat, Split, Reshape, ...)
  whose inputs share one scale pass it on; only the other activations are calibrated (``calibrate_ranges``: one run
  over the data for exactly those tensors, a batch at a time, with onnxruntime's calibrator classes);
* onnxruntime's calibrators as they come have a trap: its Entropy calibrator's defaults (128 histogram bins and 128
  quantized bins) leave the KL search a single candidate, the whole range, so Entropy equals MinMax; here it gets
  512 histogram bins into 256 quantized ones: of the settings tried on YOLOv8n (16 calibration images, worst
  held-out image's class scores), 2048/128 gave 0.51, 2048/256 0.70, 2048/512 0.87 and 512/256 0.92, and 2048
  bins cost minutes of its pure-Python search.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import ModelError, UsageError
from ..progress import track

#: Calibration methods: name → (onnxruntime CalibrationMethod name, calibrator options).
METHODS: dict[str, tuple[str, dict]] = {
    "minmax": ("MinMax", {}),
    "percentile": ("Percentile", {"num_bins": 2048, "percentile": 99.999, "symmetric": True}),
    "entropy": ("Entropy", {"num_bins": 512, "num_quantized_bins": 256}),
}
#: The ops quantized (their inputs, weights and outputs); other ops of a region stay float between them.
CONVS = ("Conv", "ConvTranspose")
#: What an int8 unit quantizes (``rules/int8.py``: a conv and the activation after it, SiLU's Sigmoid and Mul
#: included), which onnxruntime runs as QLinearConv, QLinearSigmoid, QLinearMul, QLinearLeakyRelu (Relu and
#: Clip fold into the conv's output range).
UNITS = CONVS + ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Mul")
#: The opset per-channel DequantizeLinear (its ``axis``) needs.
MIN_OPSET = 13
#: Ops that move values without computing new ones: their outputs take their inputs' scale when all share one.
MOVES = {"Concat", "Split", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity",
         "DepthToSpace", "SpaceToDepth", "MaxPool"}


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has the VNNI dot-product instructions (AVX512-VNNI or AVX-VNNI); None when it is
    not x86 or its flags cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def reduce_range(setting: str) -> bool:
    """``reduce_range`` for a rule's ``yes``/``no``/``auto``: auto is on for x86 CPUs without VNNI, where
    onnxruntime's u8s8 kernels can saturate (its documented advice), and off elsewhere."""
    if setting == "auto":
        return cpu_has_vnni() is False
    return setting == "yes"


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints progress to stdout and warns through the root logger: neither reaches
    convgraph's output (stdout may be a --json document)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _One:
    """A CalibrationDataReader over one feed (the calibrators keep every batch a reader gives until it ends:
    one at a time keeps memory at one batch of activations)."""

    def __init__(self, feed: Mapping[str, np.ndarray]):
        self.feed: dict | None = dict(feed)

    def get_next(self) -> dict | None:
        feed, self.feed = self.feed, None
        return feed


def calibrate_ranges(model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]],
                     method: str, *, types: Mapping | None = None) -> dict[str, tuple[float, float]]:
    """tensor → (low, high) of ``tensors`` (float activations of ``model``'s main graph) over ``feeds``, as
    onnxruntime's calibrator for ``method`` (minmax, percentile, entropy) computes them. ``types``: tensor →
    TensorInfo (``ConvGraph.shapes``) for tensors onnx's shape inference leaves untyped."""
    from onnxruntime.quantization import calibrate as ortcal

    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    wanted = list(dict.fromkeys(tensors))
    if not wanted:
        return {}
    kind, options = METHODS[method]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    typed = {v.name for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    for t in wanted:
        info = (types or {}).get(t)
        if t not in typed and info is not None and info.elem_type:
            m.graph.value_info.append(helper.make_tensor_value_info(t, info.elem_type, None))
    with tempfile.TemporaryDirectory(prefix="convgraph.calib.") as tmp, _quiet():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(m, path, save_as_external_data=m.ByteSize() > (1 << 30), location="model.data")
        cls = {"MinMax": ortcal.MinMaxCalibrater, "Percentile": ortcal.PercentileCalibrater,
               "Entropy": ortcal.EntropyCalibrater}[kind]
        cal = cls(str(path), None, str(Path(tmp) / "augmented.onnx"), **options)

        def select(model: onnx.ModelProto):  # exactly the tensors asked for, not every input of some op types
            infos = {v.name: v for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
            missing = [t for t in wanted if t not in infos]
            if missing:
                raise ModelError(f"cannot calibrate {missing[0]!r}: its type is unknown")
            return set(wanted), infos

        cal.select_tensors_to_calibrate = select
        cal.augment_graph()
        cal.create_inference_session()
        n = 0
        for feed in track(feeds, "calibrating activation ranges"):
            bad = [k for k, v in feed.items() if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]
            if bad:  # onnxruntime's calibrators skip NaN silently: a sample that holds some is refused
                raise UsageError(f"calibration sample {n} has NaN/Inf values in input {bad[0]!r}")
            cal.collect_data(_One(feed))
            n += 1
        if not n:
            raise UsageError("the calibration set is empty")
        data = cal.compute_data()
    out = {}
    for t in wanted:
        lo, hi = data[t].range_value if hasattr(data[t], "range_value") else data[t][:2]
        lo, hi = float(np.min(lo)), float(np.max(hi))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ModelError(f"calibration of {t!r} gave a range that is not finite ({lo}, {hi}): NaN/Inf upstream")
        out[t] = (lo, hi)
    return out


def through_clips(nodes: Iterable[onnx.NodeProto], ranges: Mapping[str, tuple[float, float]], value
                  ) -> dict[str, tuple[float, float]]:
    """``ranges`` with the output of each Relu and Clip of ``nodes`` given its input's range clipped to the
    activation's bounds (``value``: tensor → constant array or None, for Clip's min and max). The quantizer folds
    such an activation into the conv before it, whose output then takes this range: calibrated on the
    activation's own output, whose spike at zero draws the Entropy calibrator to too small a range (PP-OCR det's
    worst conv alone: cosine 0.885 that way, 0.97 with MinMax)."""
    out = dict(ranges)
    for n in nodes:
        if n.op_type not in ("Relu", "Clip") or not n.input or n.input[0] not in out:
            continue
        lo, hi = 0.0, float("inf")
        if n.op_type == "Clip":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            bounds = [attrs.get("min"), attrs.get("max")]
            given = [n.input[i] if len(n.input) > i else "" for i in (1, 2)]
            values = [value(t) if t else None for t in given]
            if any(t and v is None for t, v in zip(given, values)):
                continue  # a bound that is not constant: the output's own calibrated range stands
            bounds = [float(np.asarray(v).reshape(())) if v is not None else b for v, b in zip(values, bounds)]
            lo = -float("inf") if bounds[0] is None else float(bounds[0])
            hi = float("inf") if bounds[1] is None else float(bounds[1])
        a, b = out[n.input[0]]
        out[n.output[0]] = (min(max(a, lo), hi), max(min(b, hi), lo))
    return out


@dataclass(frozen=True)
class Scale:
    """A per-tensor quantization: scale, zero point and its element type (an ONNX TensorProto type)."""

    scale: float
    zero_point: int
    elem_type: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


def _scalar(graph, tensor: str) -> np.ndarray | None:
    from ..model.weights import constant_value

    v = constant_value(graph, tensor) if tensor else None
    return v if v is not None and v.size == 1 else None


def _qparams(graph, node: onnx.NodeProto) -> Scale | None:
    """The per-tensor scale and zero point of a QuantizeLinear/DequantizeLinear node (None when per-axis or
    not constant)."""
    scale = _scalar(graph, node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return None
    zp = _scalar(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    elem = helper.np_dtype_to_tensor_dtype(zp.dtype) if zp is not None else onnx.TensorProto.UINT8
    return Scale(float(scale.reshape(())), int(zp.reshape(())) if zp is not None else 0, elem)


def made_by_dequantize(graph, tensor: str) -> Scale | None:
    """The quantization of ``tensor`` when a per-tensor DequantizeLinear of an activation makes it."""
    nid = graph.producer(tensor)
    d = graph.graph.nodes[nid] if nid is not None else None
    if d is None or d["kind"] != "op" or d["op_type"] != "DequantizeLinear" or d["domain"] not in ("", "ai.onnx"):
        return None
    from ..model.weights import constant_source

    if constant_source(graph, d["proto"].input[0]) not in ("input", "unknown"):
        return None  # a constant's DequantizeLinear (weights), not an activation's
    return _qparams(graph, d["proto"])


def read_by_quantize(graph, tensor: str) -> Scale | None:
    """The quantization of ``tensor`` when QuantizeLinears of one per-tensor scale are all that read it."""
    readers = graph.consumers(tensor)
    found: set[Scale | None] = set()
    for r in readers:
        d = graph.graph.nodes[r]
        if d["kind"] != "op" or d["op_type"] != "QuantizeLinear" or d["proto"].input[0] != tensor:
            return None
        found.add(_qparams(graph, d["proto"]))
    return found.pop() if len(found) == 1 and None not in found else None


@dataclass
class Plan:
    """How the activations of a region are quantized: ``kept`` take a scale the graph has (a DequantizeLinear
    makes them or QuantizeLinears read them: their new quantizer pair is dropped), ``passed`` take their inputs'
    scale through a data-movement op, ``float`` stay unquantized, the others (``calibrate``) need a range."""

    inputs: list[str]
    outputs: list[str]
    kept: dict[str, Scale]
    passed: dict[str, Scale]
    float: set[str]
    calibrate: list[str]


def plan(graph, nodes: Sequence[onnx.NodeProto], outputs: Sequence[str], *, quantize_io: bool) -> Plan:
    """What each float activation that ``nodes`` read or make needs (see :class:`Plan`). ``outputs``: the
    tensors the rest of the graph reads; ``quantize_io``: quantize the region's inputs and outputs that the
    graph does not quantize already (the int8 rule) — else they stay float (a rewrite of a QDQ conv keeps the
    original's activation quantization and adds none at its boundary)."""
    from ..model.weights import constant_value

    made = {o for n in nodes for o in n.output if o}
    inputs = [t for t in dict.fromkeys(i for n in nodes for i in n.input if i)
              if t not in made and constant_value(graph, t) is None]
    kept: dict[str, Scale] = {}
    flt: set[str] = set()
    for tensors, scale_of in ((inputs, made_by_dequantize), (outputs, read_by_quantize)):
        for t in tensors:
            s = scale_of(graph, t)
            if s is not None:
                kept[t] = s
            elif not quantize_io:
                flt.add(t)
    passed: dict[str, Scale] = {}
    known = dict(kept)
    for n in nodes:  # in order: a data-movement op passes on the one scale its inputs share
        if n.op_type not in MOVES:
            continue
        scales = {known.get(i) for i in (n.input if n.op_type == "Concat" else n.input[:1]) if i}
        s = scales.pop() if len(scales) == 1 else None
        if s is not None:
            for o in n.output:
                if o and o not in kept:
                    known[o] = passed[o] = s
    produced = [o for n in nodes for o in n.output if o]
    calibrate = [t for t in [*inputs, *produced] if t not in kept and t not in passed and t not in flt]
    return Plan(inputs, list(outputs), kept, passed, flt, list(dict.fromkeys(calibrate)))


def quantize_region(graph, nodes: Sequence[onnx.NodeProto], p: Plan, ranges: Mapping[str, tuple[float, float]], *,
                    method: str, reduce: bool, base: str, ops: Sequence[str] = CONVS
                    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``nodes`` (float, with constant weights in ``graph``) in QDQ form by onnxruntime's ``quantize_static``:
    the new nodes and initializers, tensor names fresh in ``graph`` except the region's inputs and outputs.
    The nodes of ``ops`` are quantized (:data:`CONVS`, or :data:`UNITS` for the int8 rule's conv and activation);
    the others stay float between them. Activations as ``p`` plans them (``ranges`` for those to calibrate);
    weights per channel, symmetric int8; activations uint8; biases int32 (onnxruntime's defaults for QDQ)."""
    from .regions import standalone

    from ..model.weights import constant_value

    ranges = through_clips(nodes, ranges, lambda t: constant_value(graph, t))
    region = standalone(graph, nodes, p.inputs, p.outputs)
    if region is None:
        raise ModelError(f"{base}: the nodes to quantize cannot be cut out alone (a constant that cannot be read)")
    overrides, table = {}, {}
    fixed = {**p.kept, **p.passed}
    for t in [*p.inputs, *[o for n in nodes for o in n.output if o]]:
        if t in fixed:
            s = fixed[t]
            overrides[t] = [{"scale": np.array(s.scale, np.float32), "zero_point": np.array(s.zero_point, s.dtype)}]
            lo, hi = s.scale * (np.iinfo(s.dtype).min - s.zero_point), s.scale * (np.iinfo(s.dtype).max - s.zero_point)
        elif t in p.float:
            lo, hi = -1.0, 1.0  # quantized, then its pair dropped again
        else:
            lo, hi = ranges[t]
        table[t] = (lo, hi)
    to_quantize = [n.name for n in region.graph.node if n.op_type in ops]  # the ops between stay as they are
    q = _quantizer(region, table, to_quantize, method=method, reduce=reduce, overrides=overrides, what=f"{base}: ")
    return _splice_ready(graph, q, p, base)


def _quantizer(model: onnx.ModelProto, table: Mapping[str, tuple[float, float]], nodes: Sequence[str], *,
               method: str, reduce: bool, op_types: Sequence[str] | None = None, overrides: dict | None = None,
               what: str = "") -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` of ``nodes`` of ``model`` in QDQ form (per-channel int8 weights, uint8
    activations) from ``table`` (tensor → (low, high), widened to hold 0; given as its calibration cache), its output
    read back; whatever it raises becomes one ModelError line (``what`` names the place)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {t: TensorData(lowest=np.array(min(lo, 0.0), np.float32), highest=np.array(max(hi, 0.0), np.float32))
            for t, (lo, hi) in table.items()}
    with tempfile.TemporaryDirectory(prefix="convgraph.quant.") as tmp, _quiet():
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "q.onnx"
        kind = getattr(CalibrationMethod, METHODS[method][0])
        save_tensors_data(TensorsData(kind, data), cache)
        try:
            quantize_static(model, out, None, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=list(nodes), op_types_to_quantize=list(op_types) if op_types else None,
                            calibrate_method=kind, calibration_cache_path=cache,
                            extra_options={"TensorQuantOverrides": overrides} if overrides else None)
        except Exception as e:  # noqa: BLE001 - whatever the quantizer raises becomes one line
            raise ModelError(f"{what}onnxruntime's quantizer failed: {' '.join(str(e).split())[:300]}") from None
        return onnx.load(out)


#: Ops that join int8 units: between int8 neighbours onnxruntime runs them on int8 too (QLinearConcat,
#: QLinearAdd, NhwcMaxPool; Split, Reshape, Resize and the like pass their input's scale on), so the values
#: between the units never go back to float.
JOINS = ("Concat", "Split", "Add", "MaxPool", "Resize", "Reshape", "Transpose", "Slice", "Flatten", "Squeeze",
         "Unsqueeze", "Identity")


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def joins_between(model: onnx.ModelProto, units: Iterable[str]) -> list[str]:
    """The names of the :data:`JOINS` ops of ``model``'s main graph that sit wholly between the int8 nodes named
    ``units``: every activation they read made by a unit or another such op, everything they make read by those
    only (and no graph output). Quantized with the units, the values between int8 neighbours stay int8 (no
    DequantizeLinear → float op → QuantizeLinear round trip). The largest such set, found with a worklist: linear
    in the graph's size."""
    g = model.graph
    inside = set(units)
    consts = _constants(g)
    outputs = {o.name for o in g.output}
    by_name = {n.name: n for n in g.node if n.name}
    producer = {o: n.name for n in g.node for o in n.output if o}
    readers: dict[str, list[str]] = {}
    for n in g.node:
        for t in n.input:
            if t:
                readers.setdefault(t, []).append(n.name)
    joins = {n.name for n in g.node if n.name and n.op_type in JOINS and n.domain in ("", "ai.onnx")} - inside

    def bad(n: onnx.NodeProto) -> bool:
        ins = [t for t in n.input if t and t not in consts]
        return (not ins or any(producer.get(t) not in inside and producer.get(t) not in joins for t in ins)
                or any(o in outputs or any(r not in inside and r not in joins for r in readers.get(o, ()))
                       for o in n.output if o))

    todo = list(joins)
    while todo:
        name = todo.pop()
        if name not in joins or not bad(by_name[name]):
            continue
        joins.discard(name)  # its neighbours among the joins may depend on it: look at them again
        n = by_name[name]
        todo += [producer[t] for t in n.input if t in producer and producer[t] in joins]
        todo += [r for o in n.output for r in readers.get(o, ()) if r in joins]
    return sorted(joins)


def activations_of(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """The activations (not constants) that the nodes named ``names`` read and make."""
    wanted = set(names)
    consts = _constants(model.graph)
    return list(dict.fromkeys(t for n in model.graph.node if n.name in wanted
                              for t in [*n.input, *n.output] if t and t not in consts))


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each main-graph Constant node that holds a tensor turned into an initializer of its output's
    name (PP-OCR det's weights are Constant nodes; onnxruntime's quantizer reads weights from initializers and
    asks for ranges of anything else). ``model`` itself when it has none."""
    kinds = {"value", "value_float", "value_floats", "value_int", "value_ints"}
    consts = [n for n in model.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
              and len(n.attribute) == 1 and n.attribute[0].name in kinds]
    if not consts:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    gone = set()
    for n in consts:
        a = n.attribute[0]
        v = onnx.numpy_helper.to_array(a.t) if a.name == "value" else np.asarray(
            helper.get_attribute_value(a), np.float32 if a.name.startswith("value_float") else np.int64)
        m.graph.initializer.append(onnx.numpy_helper.from_array(v, n.output[0]))
        gone.add(n.output[0])
    kept = [n for n in m.graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in gone)]
    del m.graph.node[:]
    m.graph.node.extend(kept)
    return m


def quantize_model(model: onnx.ModelProto, units: Sequence[str], ranges: Mapping[str, tuple[float, float]], *,
                   method: str, reduce: bool) -> onnx.ModelProto:
    """``model`` (float) with the nodes named ``units`` (int8 units: convs and their activations) and the
    :data:`JOINS` between them (:func:`joins_between`) in QDQ form, in one pass of onnxruntime's
    ``quantize_static``: a tensor two of them share has one quantization, and onnxruntime runs the run of them
    on int8. ``ranges``: tensor → (low, high) for every activation they read or make."""
    model = constants_as_initializers(model)  # the quantizer takes weights from initializers only
    names = set(units) | set(joins_between(model, units))
    inits = {t.name: t for t in model.graph.initializer}
    ranges = through_clips([n for n in model.graph.node if n.name in names], ranges,
                           lambda t: onnx.numpy_helper.to_array(inits[t]) if t in inits else None)
    tensors = activations_of(model, names)
    missing = [t for t in tensors if t not in ranges]
    if missing:
        raise ModelError(f"no calibrated range for {missing[0]!r} ({len(missing)} tensor(s) in all)")
    table = {t: ranges[t] for t in tensors}
    types = sorted({n.op_type for n in model.graph.node if n.name in names})
    return _quantizer(model, table, sorted(names), method=method, reduce=reduce, op_types=types)


def _splice_ready(graph, q: onnx.ModelProto, p: Plan, base: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The quantized region's nodes and initializers with the pairs on kept or float boundary tensors dropped and
    every other tensor named afresh in ``graph``."""
    nodes = list(q.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    boundary = set(p.inputs) | set(p.outputs)
    for t in boundary:
        if t not in p.kept and t not in p.float:
            continue
        if t in p.inputs:  # t → Q → DQ → readers: the readers read t again
            for qn in [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == t]:
                for dq in [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] == qn.output[0]]:
                    rename[dq.output[0]] = t
                    drop |= {id(qn), id(dq)}
        else:  # maker → t' → Q → DQ → t: the maker writes t again
            dq = producer.get(t)
            qn = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if qn is not None and qn.op_type == "QuantizeLinear":
                rename[qn.input[0]] = t
                drop |= {id(qn), id(dq)}
    kept_nodes = [n for n in nodes if id(n) not in drop]
    used = {i for n in kept_nodes for i in n.input if i}
    inits = [t for t in q.graph.initializer if t.name in used]
    taken = set(boundary)
    for t in [*inits, *[o for n in kept_nodes for o in n.output]]:
        name = t.name if isinstance(t, onnx.TensorProto) else t
        if name in rename or name in boundary:
            continue
        short = name.replace("_QuantizeLinear_Output", "/q").replace("_DequantizeLinear_Output", "/dq")
        short = short.replace("_QuantizeLinear_Input", "/float")
        if not short.startswith(base):
            short = f"{base}/{short}"
        new = graph.unique_tensor(short)
        while new in taken:
            new = graph.unique_tensor(new + "_")
        taken.add(new)
        rename[name] = new
    out_nodes = []
    for n in kept_nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for field in (c.input, c.output):
            for i, t in enumerate(field):
                if t in rename:
                    field[i] = rename[t]
        if c.op_type in ("QuantizeLinear", "DequantizeLinear") or not c.name.startswith(base):
            c.name = f"{base}/{c.name}" if not c.name.startswith(base) else c.name
        out_nodes.append(c)
    out_inits = []
    for t in inits:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = rename.get(t.name, t.name)
        out_inits.append(c)
    return out_nodes, out_inits


def ensure_opset(model: onnx.ModelProto, version: int = MIN_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """``model`` at ai.onnx opset ``version`` or later: converted by ``onnx.version_converter`` when below
    (per-channel DequantizeLinear needs ``axis``: opset 13); (model, what was done or None)."""
    from onnx import version_converter

    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if have >= version:
        return model, None
    try:
        converted = version_converter.convert_version(model, version)
    except Exception as e:  # noqa: BLE001 - onnx's converter raises several kinds
        raise ModelError(f"the model is opset {have}; per-channel int8 needs opset {version}, and "
                         f"onnx.version_converter failed: {' '.join(str(e).split())[:200]}") from None
    return converted, (f"converted the model from opset {have} to {version} (onnx.version_converter): "
                       f"per-channel DequantizeLinear needs its axis attribute, opset {version}")


def int8_kernels(model: onnx.ModelProto, provider: str = "cpu") -> set[str]:
    """The names of the conv nodes of ``model`` that onnxruntime runs as int8 kernels: its optimized graph (all
    optimizations, as a session runs it) holds a QLinearConv made from them (named ``<conv>_token_<n>``)."""
    import re

    from ..run.runtime import create_session

    with tempfile.TemporaryDirectory(prefix="convgraph.opt.") as tmp:
        path = Path(tmp) / "optimized.onnx"
        create_session(model, provider=provider, threads=1, quiet=True, options={"optimized_model_filepath": str(path)})
        opt = onnx.load(path, load_external_data=False)
    return {re.sub(r"_token_\d+$", "", n.name) for n in opt.graph.node if n.op_type in ("QLinearConv", "ConvInteger")}


def weight_error(before: Sequence[np.ndarray], nodes: Sequence[onnx.NodeProto], inits: Sequence[onnx.TensorProto]) -> float:
    """The relative Frobenius error of the quantized convs' weights (``nodes``, ``inits``: a quantized region)
    against ``before``, the float weights of the same convs in the same order."""
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in inits}
    made = {o: n for n in nodes for o in n.output}
    num = den = 0.0
    convs = [n for n in nodes if n.op_type in CONVS]
    for w, conv in zip(before, convs):
        dq = made.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in values:
            continue
        q, scale = values[dq.input[0]], values.get(dq.input[1], np.ones(1))
        zp = values.get(dq.input[2], np.zeros_like(scale)) if len(dq.input) > 2 else np.zeros_like(scale)
        shape = [-1] + [1] * (q.ndim - 1) if scale.size > 1 else [1] * q.ndim
        d = (q - zp.reshape(shape)) * scale.reshape(shape) - np.asarray(w, np.float64)
        num += float(np.sum(d * d))
        den += float(np.sum(np.asarray(w, np.float64) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _span(scale: float, zero_point: int, dtype: np.dtype) -> float:
    """The largest magnitude a quantization can represent."""
    info = np.iinfo(dtype)
    return scale * max(abs(int(info.min) - zero_point), abs(int(info.max) - zero_point))


def predicted_noise(nodes: Sequence[onnx.NodeProto], inits: Sequence[onnx.TensorProto], graph, p: Plan,
                    ranges: Mapping[str, tuple[float, float]]) -> float:
    """The RMS noise that quantizing a region adds at its outputs, against the same nodes in float on the same
    inputs: each new rounding of an activation (uniform, variance step²/12) and of a weight (per output channel:
    step²/12 times the patch's Σx², bounded with the input's largest magnitude), carried through the convs after
    it by their mean squared row norm; data-movement and element-wise ops pass it on. A requantized exact rewrite
    is held to this (times a margin): its error should be that noise, not more."""
    from ..model.weights import constant_value

    values = {t.name: onnx.numpy_helper.to_array(t) for t in inits}

    def value(t: str) -> np.ndarray:
        v = values[t] if t in values else constant_value(graph, t)
        return np.asarray(v if v is not None else 0.0, np.float64)

    var: dict[str, float] = {t: 0.0 for t in p.inputs}  # the region's inputs are the same in both
    peak: dict[str, float] = {}
    for t in p.inputs:
        s = p.kept.get(t)
        peak[t] = _span(s.scale, s.zero_point, s.dtype) if s is not None else max(map(abs, ranges.get(t, (0.0, 0.0))))
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # DequantizeLinear output → (weights, step per row)
    for n in nodes:
        ins = [i for i in n.input if i]
        if n.op_type == "DequantizeLinear" and ins[0] in values:  # a constant's: weights or bias
            q, scale = value(ins[0]), value(ins[1])
            zp = value(ins[2]) if len(ins) > 2 else np.zeros_like(scale)
            shape = [-1] + [1] * (q.ndim - 1) if scale.size > 1 else [1] * q.ndim
            w = (q - zp.reshape(shape)) * scale.reshape(shape)
            weights[n.output[0]] = (w, np.broadcast_to(scale.reshape(-1), (w.shape[0] if w.ndim else 1,)))
            continue
        if n.op_type == "QuantizeLinear":  # a new rounding of an activation
            step = float(value(ins[1]).reshape(-1)[0])
            zero = int(value(ins[2]).reshape(-1)[0]) if len(ins) > 2 else 0
            dtype = values[ins[2]].dtype if len(ins) > 2 and ins[2] in values else np.dtype(np.uint8)
            var[n.output[0]] = var.get(ins[0], 0.0) + step * step / 12
            peak[n.output[0]] = _span(step, zero, dtype)
            continue
        if n.op_type == "Conv" and len(ins) > 1 and ins[1] in weights:
            w, steps = weights[ins[1]]
            rows = w.reshape(w.shape[0], -1)
            gain = float(np.mean(np.sum(rows * rows, axis=1)))
            weight_var = float(np.mean(steps * steps / 12)) * rows.shape[1] * peak.get(ins[0], 0.0) ** 2
            var[n.output[0]] = var.get(ins[0], 0.0) * gain + weight_var
            peak[n.output[0]] = peak.get(ins[0], 0.0) * float(np.abs(rows).sum(axis=1).max())
            continue
        for o in n.output:  # dequantizing, moving or element-wise: the noise passes on
            if o:
                var[o] = max([var.get(i, 0.0) for i in ins] or [0.0])
                peak[o] = max([peak.get(i, 0.0) for i in ins] or [0.0])
    return float(np.sqrt(max([var.get(t, 0.0) for t in p.outputs] or [0.0])))


def float_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the quantization of its activations taken out: each DequantizeLinear of a QuantizeLinear's
    output becomes an Identity of that QuantizeLinear's input (weights stay as dequantized). Run against the
    original, it shows the noise the original's activation quantization adds (main graph)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    made = {o: n for n in m.graph.node for o in n.output}
    for i, n in enumerate(m.graph.node):
        q = made.get(n.input[0]) if n.op_type == "DequantizeLinear" and n.input else None
        if q is not None and q.op_type == "QuantizeLinear":
            m.graph.node[i].CopyFrom(helper.make_node("Identity", [q.input[0]], [n.output[0]], name=n.name))
    return m
