"""Helpers the test modules share: models, rewrites checked against onnxruntime, inputs, files, the CLI."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph import load
from convgraph.analysis.analyze import analyze
from convgraph.engine.calibrate import calibrate
from convgraph.cli import main
from convgraph.registry import get_rule
from convgraph.rule import Replacement, RuleContext
from convgraph.run.runtime import create_session
from convgraph.model.weights import constant_value


# ---- rewriting single ops and comparing with onnxruntime -------------------------------------------------
ONNX_DATA = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


EXACT_TOL = 1e-4


def single_op(op: str, x_shape, w: np.ndarray, b: np.ndarray | None = None, *, opset: int = 17,
              elem: int = TensorProto.FLOAT, extra_nodes=(), extra_inits=(), out: str = "y", **attrs) -> onnx.ModelProto:
    """A model with input ``x`` (dims may be names), one conv node ``conv`` (weight ``w``, bias ``b``) → ``y``."""
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    conv_out = "y" if not extra_nodes else "conv_out"
    node = helper.make_node(op, ["x", "w"] + (["b"] if b is not None else []), [conv_out], name="conv", **attrs)
    rank = len(x_shape)
    graph = helper.make_graph([node, *extra_nodes], "g", [helper.make_tensor_value_info("x", elem, list(x_shape))],
                              [helper.make_tensor_value_info(out, elem, [None] * rank)], inits + list(extra_inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def input_shape(model: onnx.ModelProto) -> list[int]:
    """The static shape of a one-input model's input."""
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def drawn_conv2d(data, min_cig: int = 1) -> onnx.ModelProto:
    """A hypothesis-drawn 2D Conv (groups, k_h×k_w ≥ 2, strides, pads/dilations or auto_pad, bias) on a
    2×C×9×10 input, as a one-op model."""
    from hypothesis import strategies as st

    g = data.draw(st.integers(1, 3), "group")
    cig, cog = data.draw(st.integers(min_cig, min_cig + 2), "C_in/g"), data.draw(st.integers(1, 3), "C_out/g")
    kh, kw = data.draw(st.integers(2, 4), "kh"), data.draw(st.integers(2, 4), "kw")
    strides = data.draw(st.lists(st.integers(1, 2), min_size=2, max_size=2), "strides")
    auto_pad = data.draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]), "auto_pad")
    attrs = dict(kernel_shape=[kh, kw], strides=strides, group=g)
    if auto_pad == "NOTSET":  # onnxruntime takes no dilations with SAME_*
        attrs["pads"] = data.draw(st.lists(st.integers(0, 2), min_size=4, max_size=4), "pads")
        attrs["dilations"] = data.draw(st.lists(st.integers(1, 2), min_size=2, max_size=2), "dilations")
    else:
        attrs["auto_pad"] = auto_pad
    rng = np.random.default_rng(data.draw(st.integers(0, 99), "seed"))
    w = rng.standard_normal((cog * g, cig, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cog * g).astype(np.float32) if data.draw(st.booleans(), "bias") else None
    return single_op("Conv", [2, cig * g, 9, 10], w, b, **attrs)


def rewrite_with(model, rule: str, params: dict | None = None, input_shapes=None
                 ) -> tuple[onnx.ModelProto, list[Replacement], dict[str, str]]:
    """Apply ``rule`` to every conv it matches, the way the engine does; returns the checked model,
    the replacements and, per conv it did not match, the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convgraph.ConvGraphWarning)  # unset dynamic dims: the rules do without
        cg = convgraph.load(model, input_shapes)
    r = get_rule(rule)
    p = r.resolve_params(params or {})
    analysis = analyze(cg, rewrites=False)
    reps, reasons, done = [], {}, set[tuple[str, str]]()
    for rec in analysis.convs:
        if (rec.graph, rec.node_id) in done:
            continue
        graph = next(g for g in cg.walk() if g.path == rec.graph)
        ctx = RuleContext(graph, analysis.by_id(rec.graph), params=params)
        why, found = r.check(rec, ctx)
        if why is not None:
            assert isinstance(why, str) and why
            reasons[rec.name or rec.node_id] = why
            continue
        rep = r.make(rec, ctx, p, found)
        removed = rep.removed or [rec.node_id]
        done.update((rec.graph, n) for n in removed)
        graph.replace(removed, rep.nodes, rep.initializers)
        graph.prune_initializers()
        reps.append(rep)
    out = cg.to_model()
    onnx.checker.check_model(out, full_check=True)
    original = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    assert [i.name for i in out.graph.output] == [o.name for o in original.graph.output]
    assert list(out.opset_import) == list(original.opset_import)
    return out, reps, reasons


def run(model, feeds: dict) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_session(model).run(None, feeds)


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.max(np.abs(ref - got)) / (np.max(np.abs(ref)) or 1.0))


def assert_same(original, rewritten, feeds: dict, tol: float = EXACT_TOL) -> float:
    worst = 0.0
    for a, b in zip(run(original, feeds), run(rewritten, feeds)):
        worst = max(worst, rel_err(a, b))
    assert worst <= tol, worst
    return worst


def random_x(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def onnx_case(path: Path) -> tuple[onnx.ModelProto, dict, list[np.ndarray]]:
    """A model of onnx's test data with its first data set: (model, feeds, expected outputs)."""
    model = onnx.load(str(path / "model.onnx"))
    data = path / "test_data_set_0"
    ins = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in sorted(data.glob("input_*.pb"))]
    outs = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in sorted(data.glob("output_*.pb"))]
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return model, dict(zip(names, ins)), outs


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---- calibration-like inputs -----------------------------------------------------------------------------
def smooth_inputs(rng, n, c, size, mixing: bool) -> np.ndarray:
    """Spatially smooth maps (white noise through three 3×3 box filters); channels mixed from a few
    sources (correlated) or independent."""
    x = rng.standard_normal((n, 3 if mixing else c, size + 6, size + 6))
    for _ in range(3):
        x = sum(x[..., i:i + x.shape[-2] - 2, j:j + x.shape[-1] - 2] for i in range(3) for j in range(3)) / 3
    if mixing:
        x = np.einsum("ca,nahw->nchw", rng.standard_normal((c, 3)), x) + 0.3 * rng.standard_normal((n, c, size, size))
    return (x + 0.5).astype(np.float32)


FIT_IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "horse.png")


HELD_OUT_IMAGES = ("camera.png", "motorcycle_right.png", "coins.png")


def image_folder(tmp_path: Path, names) -> Path:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    tmp_path.mkdir(parents=True, exist_ok=True)
    for n in names:
        os.symlink(data / n, tmp_path / n)
    return tmp_path


def yolo_layer(path, tmp_path, node: str = "/model.6/m.0/cv1/conv/Conv"):
    """A real YOLOv8n (320×320) conv: its calibration statistics on FIT_IMAGES, weight, bias, and its input
    on HELD_OUT_IMAGES (stacked)."""
    from convgraph.run.inputs import make_inputs
    from convgraph.run.runtime import create_session, expose_tensors, run

    shapes = {"images": [1, 3, 320, 320]}
    cg = load(path, shapes)
    opts: dict[str, Any] = {"image_size": (320, 320)}
    stats = calibrate(cg, str(image_folder(tmp_path / "fit", FIT_IMAGES)), nodes=[node], input_options=opts)
    s = stats[node]
    w, b = constant_value(cg, cg.node(node).input[1]), constant_value(cg, cg.node(node).input[2])
    sess = create_session(expose_tensors(cg.to_model(), [s.input], cg.shapes))
    held = make_inputs(cg.to_model(), str(image_folder(tmp_path / "held", HELD_OUT_IMAGES)), input_shapes=shapes,
                       **opts)
    return s, w, b, np.concatenate([run(sess, feed, [s.input])[0] for feed in held])


# ---- perturbed models ------------------------------------------------------------------------------------
def conv_weight(model: onnx.ModelProto, conv: onnx.NodeProto) -> onnx.TensorProto:
    """The conv's weight tensor, an initializer or a Constant node's value (PP-OCR keeps weights there)."""
    name = conv.input[1]
    for t in model.graph.initializer:
        if t.name == name:
            return t
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return next(a.t for a in n.attribute if a.name == "value")
    raise AssertionError(f"no weight {name} for {conv.name}")


def perturbed(model: onnx.ModelProto, conv_name: str, scale: float = 0.5) -> onnx.ModelProto:
    """A copy whose conv ``conv_name`` has noise of ``scale`` × the weights' std added to its weights."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    conv = next(n for n in m.graph.node if n.name == conv_name)
    t = conv_weight(m, conv)
    w = numpy_helper.to_array(t)
    noise = np.random.default_rng(1).standard_normal(w.shape) * scale * (w.std() or 1.0)
    t.CopyFrom(numpy_helper.from_array((w + noise).astype(w.dtype), t.name))
    return m


# ---- the optimizer ---------------------------------------------------------------------------------------
FAST = {"layer_runs": 5, "bench_runs": 5, "max_evals": 2, "probe": 2}


def smooth_feeds(n: int, seed: int, shape=(1, 3, 64, 64)) -> list[dict]:
    """Image-like inputs: smooth random fields (neighbouring pixels correlated), not white noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((shape[0], shape[1], shape[2] + 8, shape[3] + 8))
        for _ in range(4):
            x = (x[..., :-2, :-2] + x[..., 1:-1, 1:-1] + x[..., 2:, 2:] + x[..., 2:, :-2]) / 4
        out.append({"x": np.ascontiguousarray(x[..., :shape[2], :shape[3]], dtype=np.float32)})
    return out


# ---- shape inference -------------------------------------------------------------------------------------
F = TensorProto.FLOAT


def const_node(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(np.array(values, np.int64), name))


def computed_reshape(*, dynamic: bool = False, body: bool = False, nonzero: bool = False,
                      opaque: bool = True) -> onnx.ModelProto:
    """x → conv → Reshape(c, Concat(Slice(Shape(c), 0, 2), [1, -1])) → conv2 at opset 12, where onnx's
    inference does not follow the computed target (it does from opset 14; PP-OCR rec's case).
    ``opaque``: the sliced shape also goes through Cast(float) → Sqrt(t·t) → Cast(int64), which the static
    engine does not evaluate either, so the Reshape output and everything after it stay unknown without
    ``--probe``. ``body``: an If whose branches run a conv on the reshaped tensor; ``nonzero``: a
    NonZero on the output (a shape that depends on values)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (4, 3, 3, 3)), ("w2", (5, 4, 1, 3)), ("w3", (2, 4, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"], name="shape"),
        const_node("st", [0]), const_node("en", [2]), const_node("ax", [0]),
        helper.make_node("Slice", ["s", "st", "en", "ax"], ["s2" if not opaque else "s1"], name="slice"),
        *([helper.make_node("Cast", ["s1"], ["f"], name="tofloat", to=TensorProto.FLOAT),
           helper.make_node("Mul", ["f", "f"], ["f2"], name="square"),
           helper.make_node("Sqrt", ["f2"], ["f3"], name="sqrt"),
           helper.make_node("Cast", ["f3"], ["s2"], name="toint", to=TensorProto.INT64)] if opaque else []),
        const_node("tail", [1, -1]),
        helper.make_node("Concat", ["s2", "tail"], ["tgt"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "tgt"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[0, 1, 0, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", F, ["n", "c", "h", "w"])]
    if body:
        branch = [helper.make_graph([helper.make_node("Conv", ["r", "w3"], [f"{b}_y"], name=f"{b}/conv")], b, [],
                                    [helper.make_tensor_value_info(f"{b}_y", F, None)]) for b in ("then", "else")]
        nodes += [helper.make_node("Constant", [], ["cond"], name="const_cond",
                                   value=numpy_helper.from_array(np.array(True), "cond")),
                  helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch[0], else_branch=branch[1])]
        outputs.append(helper.make_tensor_value_info("z", F, ["n", "c", "h", "w"]))
    if nonzero:
        nodes.append(helper.make_node("NonZero", ["y"], ["nz"], name="nonzero"))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "k"]))
    x = helper.make_tensor_value_info("x", F, ["N", 3, "H", "W"] if dynamic else [1, 3, 8, 8])
    m = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    return m


# ---- files and the CLI -----------------------------------------------------------------------------------
def write_model(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    p = folder / name
    p.write_bytes(model.SerializeToString())
    return p


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---- the onnx conformance models --------------------------------------------------------------------------------
BACKEND = sorted(ONNX_DATA.glob("*/*/model.onnx"))


LIGHT = sorted((ONNX_DATA / "light").glob("*.onnx"))


#: Real models and the input shape their dynamic dims get (PP-OCR's are fully dynamic).
REAL = {
    "ppocr-det": {"x": [1, 3, 640, 640]},
    "ppocr-rec": {"x": [1, 3, 48, 320]},
    "ppocr-cls": {"x": [1, 3, 48, 192]},
    "yolov8n": {"images": [1, 3, 320, 320]},
}


def cpu_session(model_bytes: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = min(2, os.cpu_count() or 1)
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def read_value(path: Path, vi: onnx.ValueInfoProto):
    """A ``test_data_set`` input file as onnxruntime takes it (tensor, sequence or optional)."""
    data = path.read_bytes()
    kind = vi.type.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    return numpy_helper.to_array(onnx.load_tensor_from_string(data))


def shipped_inputs(path: Path, model: onnx.ModelProto) -> dict:
    folder = path.parent / "test_data_set_0"
    return {vi.name: read_value(folder / f"input_{i}.pb", vi) for i, vi in enumerate(graph_inputs(model))}


def light_inputs(model: onnx.ModelProto) -> dict:
    """What onnx's backend runner feeds the light models: arange(n)/n, unknown dims set to 1."""
    feeds = {}
    for vi in graph_inputs(model):
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        feeds[vi.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


@functools.lru_cache(maxsize=None)
def original_run(path: str) -> tuple[bool, Any]:
    """(True, outputs) when onnxruntime runs the original with its shipped inputs, else (False, reason)."""
    p = Path(path)
    model = onnx.load(p)
    feeds = light_inputs(model) if p.parent.name == "light" else shipped_inputs(p, model)
    try:
        return True, cpu_session(p.read_bytes()).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime raises means it cannot run this model
        return False, str(e).strip().splitlines()[0]


def external_weight(model: onnx.ModelProto, folder: Path, location: str) -> tuple[Path, bytes]:
    """``model`` written to ``folder/m.onnx`` with its first initializer's data moved out to ``location``
    (relative to ``folder``, or not); the data is returned, not written: the test puts it where it wants."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    w = m.graph.initializer[0]
    raw = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    folder.mkdir(parents=True, exist_ok=True)
    return write_model(folder, m), raw



def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` computing in float16: float initializers, Constant values, Casts to float and the graph's inputs
    and outputs made float16 (value_info dropped: shape inference types it again)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    return m


def resized_if(then_nodes: list[onnx.NodeProto], inner_kernel: int, add_main: bool) -> onnx.ModelProto:
    """x [1,3,8,8] → Resize by scales Sqrt([1,1,4,4]) (no value rule: its shape is lost) → conv "main" (``m``);
    an If on sr > 8000 (sr an int64 input) runs ``then_nodes`` (reading ``m``, weight ``w2`` of
    4×4×``inner_kernel``², constant ``sq``; making ``ya``), else passes ``m`` on; y = the If's output, plus
    ``m`` with ``add_main``."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 4, inner_kernel, inner_kernel)).astype(np.float32),
                                     "w2"),
             numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "sq"),
             numpy_helper.from_array(np.array(8000, np.int64), "limit")]
    then = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("ya", f, [1, 4, None, None])])
    other = helper.make_graph([helper.make_node("Identity", ["m"], ["yb"])], "else", [],
                              [helper.make_tensor_value_info("yb", f, [1, 4, None, None])])
    nodes = [helper.make_node("Sqrt", ["sq"], ["scales"]),
             helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Conv", ["r", "w"], ["m"], name="main", pads=[1, 1, 1, 1]),
             helper.make_node("Greater", ["sr", "limit"], ["cond"]),
             helper.make_node("If", ["cond"], ["b" if add_main else "y"], name="if", then_branch=then,
                              else_branch=other)]
    if add_main:
        nodes.append(helper.make_node("Add", ["b", "m"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 3, 8, 8]),
                                       helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", f, [1, 4, None, None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m
