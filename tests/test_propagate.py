"""The static shape engine (convgraph.model.propagate, convgraph.model.expr): shapes and MACs without running the model,
as formulas over the dims left dynamic, cross-checked against shapes measured by onnxruntime."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
from convgraph.analysis.analyze import analyze
from convgraph.cli import main
from convgraph.errors import ModelError, UsageError
from convgraph.model.expr import Expr, parse
from convgraph.run.inputs import make_inputs
from convgraph.model.probe import probe_shapes
from helpers import BACKEND, LIGHT, REAL, light_inputs, original_run, resized_if, shipped_inputs


pytestmark = pytest.mark.filterwarnings("ignore::convgraph.errors.ConvGraphWarning")
F = TensorProto.FLOAT
H, W = Expr.symbol("H"), Expr.symbol("W")


def _expr(v: object) -> Expr:
    """``v``, which must be an Expr (arithmetic on Exprs may give an int or a Fraction: not these)."""
    assert isinstance(v, Expr), v
    return v


def _load(source, shapes=None, values=None) -> convgraph.ConvGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convgraph.load(source, shapes, input_values=values)


# ---- expressions ----------------------------------------------------------------------------------------
def test_nested_floor_divisions_collapse() -> None:
    e = ((H - 1) // 2 + 1 - 1) // 2 + 1
    assert e == parse("(H-1)//4+1") and str(e) == "(H+3)//4" and _expr(e).size() == 5
    assert -(-H // 2) == (H + 2 - 3) // 2 + 1  # SAME padding's ceil and explicit pads meet in one form
    assert str((3 * H) // 2) == "H+H//2" and _expr(H * W * 6).exact_div(_expr(H * 2)) == 3 * W
    assert _expr(7920 * H * W).compact() == "7.9k·H·W" and _expr((H + 3) // 4).compact() == "⌈H/4⌉"
    assert str(-((H + 1) // 2)) == "-((H+1)//2)"  # a leading minus binds tighter than //


#: the operations of the random chains below, each of (a, b, k, c): k a positive divisor, c a factor
_OPS = (lambda a, b, k, c: a + b, lambda a, b, k, c: a - b, lambda a, b, k, c: a // k, lambda a, b, k, c: a * c,
        lambda a, b, k, c: -(-a // k), lambda a, b, k, c: a % k)


def test_expressions_equal_integer_arithmetic() -> None:
    """Random +, −, ·, //, ceil, mod chains: the Expr, its text and its evaluation agree with plain ints."""
    points = [(h, w) for h in range(1, 9) for w in (1, 3, 7)]
    for trial in range(20):
        rng = random.Random(trial)
        exprs = [H, W, H + 1, 2 * H - 1]
        vals = {p: [p[0], p[1], p[0] + 1, 2 * p[0] - 1] for p in points}
        for _ in range(150):
            i, j, k, c = rng.randrange(len(exprs)), rng.randrange(len(exprs)), rng.randint(1, 5), rng.randint(-3, 3)
            f = rng.choice(_OPS)
            r = f(exprs[i], exprs[j], k, c)
            if isinstance(r, Expr) and r.size() > 40:
                continue
            exprs.append(r)
            for p in points:
                vals[p].append(f(vals[p][i], vals[p][j], k, c))
        for n, e in enumerate(exprs):
            for p in points:
                env = {"H": p[0], "W": p[1]}
                want = vals[p][n]
                assert (e.evaluate(env) if isinstance(e, Expr) else e) == want
                assert eval(str(e), {"__builtins__": {}}, env) == want and parse(str(e)) == e


def test_parse_refuses_what_is_not_an_integer_expression() -> None:
    for text in ("H ** 2", "__import__('os')", "H / 2", "1.5 * H", "H +"):
        with pytest.raises(ValueError):
            parse(text)


# ---- the formulas equal the concrete analysis -----------------------------------------------------------
def _check_formulas(path: Path, concrete: dict) -> int:
    """Analyze symbolically and at ``concrete``; every conv's formula at that shape equals the concrete MACs."""
    sym = analyze(_load(path), rewrites=False)
    values = {}
    for name, info in sym.symbols.items():
        values[name] = concrete[info["input"]][info["axis"]]
    fixed = analyze(_load(path, concrete), rewrites=False)
    assert len(sym) == len(fixed)
    for a, b in zip(sym, fixed):
        assert a.macs_expr is not None and b.macs is not None, (path.name, a.name)
        got = eval(a.to_dict()["macs_expr"], {"__builtins__": {}}, dict(values))
        assert got == b.macs, (path.name, a.name, a.macs_expr)
        assert _expr(parse(a.to_dict()["macs_bias_expr"])).evaluate(values) == b.macs_bias if isinstance(
            a.macs_bias_expr, Expr) else a.macs_bias_expr == b.macs_bias
    total = sym.totals["macs_expr"]
    assert eval(total, {"__builtins__": {}}, dict(values)) == fixed.totals["macs"]
    assert all(k.isidentifier() for k in values)
    return len(sym)


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_formulas_evaluate_to_the_concrete_macs(real_models, name: str) -> None:
    path = real_models(name)
    assert _check_formulas(path, REAL[name]) > 30
    for shape in ([2, 3, 96, 160], [1, 3, 64, 224]):  # more points (det and yolo need multiples of 32)
        n = REAL[name]
        _check_formulas(path, {k: shape for k in n})


def test_sample_model_formulas_evaluate_to_the_concrete_macs(models_dir) -> None:
    dynamic = [p for p in sorted(models_dir.glob("*.onnx")) if any(
        not d.HasField("dim_value") for vi in onnx.load(p, load_external_data=False).graph.input
        for d in vi.type.tensor_type.shape.dim)]
    assert dynamic
    for p in dynamic:
        model = onnx.load(p, load_external_data=False)
        shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else 5 + 3 * j
                            for j, d in enumerate(vi.type.tensor_type.shape.dim)] for vi in model.graph.input
                  if vi.name not in {t.name for t in model.graph.initializer}}
        _check_formulas(p, shapes)


def test_named_symbols_for_partly_fixed_shapes(models_dir, capsys) -> None:
    a = analyze(_load(models_dir / "dynamic.onnx", {"x": [1, 3, "h", "w"]}), rewrites=False)
    assert a.symbols == {"h": {"input": "x", "axis": 2}, "w": {"input": "x", "axis": 3}}
    assert str(a.convs[0].macs_expr) == "216*h*w"
    code = main(["analyze", str(models_dir / "dynamic.onnx"), "--json", "--input-shape", "x=2,3,h,w"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["symbols"] == a.symbols and doc["convs"][0]["macs_expr"] == "432*h*w"
    assert doc["convs"][0]["macs"] is None and doc["convs"][0]["output_shape"] == [2, 8, "h", "w"]


@pytest.mark.real
def test_model_dim_names_become_python_identifiers(real_models) -> None:
    a = analyze(_load(real_models("ppocr-det")), rewrites=False)  # dims named p2o.DynamicDimension.0/1/2
    assert a.symbols == {"N": {"input": "x", "axis": 0}, "H": {"input": "x", "axis": 2},
                                  "W": {"input": "x", "axis": 3}}
    cls = analyze(_load(real_models("ppocr-cls")), rewrites=False)  # two dims both named "?": two symbols
    assert set(cls.symbols) == {"N", "H", "W"}


def test_table_shows_formulas_compactly(models_dir, capsys) -> None:
    assert main(["analyze", str(models_dir / "dynamic.onnx")]) == 0
    out = capsys.readouterr().out
    assert "216·H·N·W" in out and "1.2k·N·⌈H/2⌉·⌈W/2⌉" in out and "N×8×H×W" in out


# ---- long chains stay linear with small expressions -----------------------------------------------------
def test_expressions_stay_small_on_a_1000_layer_chain() -> None:
    from make_chain import make_chain

    model = make_chain(1000)
    vi = model.graph.input[0].type.tensor_type.shape
    vi.dim[2].dim_param, vi.dim[3].dim_param = "H", "W"
    a = analyze(_load(model), rewrites=False)
    assert len(a) == 500 and all(str(r.macs_expr) == "576*H*W" for r in a)
    assert a.totals["macs_expr"] == "288000*H*W"
    nodes, inits, x = [], [], "x"
    for i in range(1000):  # stride-2 3×3 convs, pads 1: sizes (s·…+1)//2 nest 1000 deep, stay one floor
        inits.append(numpy_helper.from_array(np.zeros((1, 1, 3, 3), np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        x = f"c{i}"
    g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", F, [1, 1, "H", "W"])],
                          [helper.make_tensor_value_info(x, F, [1, 1, None, None])], inits)
    strided = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    b = analyze(_load(strided), rewrites=False)
    assert max(r.macs_expr.size() for r in b if isinstance(r.macs_expr, Expr)) <= 12
    shape = b.convs[2].output_shape
    assert shape is not None and str(shape[2]) == "(H+7)//8"


# ---- the probe agrees with the static shapes -----------------------------------------------------------
def _static_vs_probe(cg: convgraph.ConvGraph) -> tuple[int, int]:
    """(tensors whose static shape equals the measured one, tensors measured); asserts no static shape is wrong."""
    names = [t for nid in cg.topological_order() for t in cg.graph.nodes[nid]["proto"].output if t]
    static = {t: cg.shape(t) for t in names}
    measured = probe_shapes(cg, names)
    agree = 0
    for t, got in measured.items():
        s = static[t]
        if s is None or not all(type(d) is int for d in s):
            continue  # unknown statically: allowed, counted
        assert tuple(s) == tuple(got), (t, s, got)
        agree += 1
    return agree, len(measured)


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_models_static_shapes_equal_probed_shapes(real_models, name: str) -> None:
    agree, measured = _static_vs_probe(_load(real_models(name), REAL[name]))
    assert agree == measured > 100  # every tensor of the main graph is known statically, and right


def test_conformance_models_static_shapes_equal_probed_shapes() -> None:
    agree = measured = models = 0
    for path in BACKEND + LIGHT:
        runs, _ = original_run(str(path))
        model = onnx.load(path)
        feeds = None if not runs else light_inputs(model) if path in LIGHT else shipped_inputs(path, model)
        if feeds is None or not all(isinstance(v, np.ndarray) for v in feeds.values()):
            continue
        cg = _load(path, values=feeds)  # the shipped inputs fix every input: shapes, values and the probe's feed
        try:
            a, m = _static_vs_probe(cg)
        except ModelError:
            continue  # an output onnxruntime will not expose
        agree, measured, models = agree + a, measured + m, models + 1
    assert models >= 100 and agree >= 0.995 * measured, (models, agree, measured)  # 109 models: 4143 of 4145


# ---- values through ops whose output shape onnx already knows -------------------------------------------
EXPORTED = Path(__file__).resolve().parent / "data" / "exported"


def _fpad_chain(length) -> onnx.ModelProto:
    """x [1,1,T] → F.pad(x, (2, 3), "reflect") as torch's exporter writes the pads → Conv1d 1→4 k5."""
    rng = np.random.default_rng(0)
    ints = {"ext": [4], "pairs": [-1, 2], "flat": [-1], "st": [-1], "en": [-(2**63)], "ax": [0], "step": [-1]}
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 5)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("Constant", [], ["p"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
             helper.make_node("ConstantOfShape", ["ext"], ["z"], value=numpy_helper.from_array(np.zeros(1, np.int64))),
             helper.make_node("Concat", ["p", "z"], ["pz"], axis=0),
             helper.make_node("Reshape", ["pz", "pairs"], ["r"]),
             helper.make_node("Slice", ["r", "st", "en", "ax", "step"], ["f"]),  # the pairs reversed
             helper.make_node("Transpose", ["f"], ["t"], perm=[1, 0]),  # onnx knows its shape [2, 3]: the fast path
             helper.make_node("Reshape", ["t", "flat"], ["r2"]),
             helper.make_node("Cast", ["r2"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["xp"], mode="reflect"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "fpad", [helper.make_tensor_value_info("x", F, [1, 1, length])],
                          [helper.make_tensor_value_info("y", F, [1, 4, None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_values_pass_ops_whose_shape_onnx_knows() -> None:
    """The pads of torch's F.pad chain pass its Transpose (whose shape onnx infers): the conv after the Pad
    gets its shape and MACs, symbolic and concrete, equal to what onnxruntime measures."""
    a = analyze(_load(_fpad_chain("T")), rewrites=False)
    assert str(a.convs[0].macs_expr) == "20*T+20" and a.convs[0].output_shape == (1, 4, Expr.symbol("T") + 1)
    cg = _load(_fpad_chain(100))
    assert analyze(cg, rewrites=False).convs[0].macs == 20 * 101
    agree, measured = _static_vs_probe(cg)
    assert agree == measured == len(cg.model.graph.node)


def test_reductions_flatten_and_transposes_carry_values() -> None:
    """Shape arithmetic through Transpose, Flatten and ReduceProd/Sum/Max of a Shape: the Reshape after them
    gets its target, symbolic too."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "one", "four"], ["chw"]),
             helper.make_node("ReduceProd", ["chw"], ["n"], keepdims=1),
             helper.make_node("ReduceMax", ["chw"], ["big"], keepdims=1),
             helper.make_node("ReduceSum", ["chw", "zero"], ["sum"], keepdims=1),
             helper.make_node("Flatten", ["n"], ["nf"], axis=0),
             helper.make_node("Transpose", ["nf"], ["nt"]),
             helper.make_node("Reshape", ["nt", "minus1"], ["nflat"]),
             helper.make_node("Concat", ["minus1", "nflat"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), k)
             for k, v in (("one", [1]), ("four", [4]), ("zero", [0]), ("minus1", [-1]))]
    g = helper.make_graph(nodes, "arith", [helper.make_tensor_value_info("x", F, [1, 3, "H", 4])],
                          [helper.make_tensor_value_info("y", F, [1, None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    cg = _load(m)
    assert cg.shape("y") == (1, 12 * H) and cg.shape("big") == (1,) and cg.shape("sum") == (1,)
    fixed = _load(m, {"x": [1, 3, 5, 4]})
    assert fixed.shape("y") == (1, 60)
    agree, measured = _static_vs_probe(fixed)
    assert agree == measured == len(nodes)  # every tensor known statically, the Reshape after them included


def test_exported_reflect_pads_get_macs_and_decide_the_if(capsys) -> None:
    """torch's own exports (tests/data/exported): the convs after F.pad/ReflectionPad2d have formulas equal
    to the concrete MACs, the If on the audio's length is decided once the length is given, and without it
    the warning asks for the length, not for the audio's values."""
    assert _check_formulas(EXPORTED / "reflect_pad_image.onnx", {"image": [1, 3, 37, 50]}) == 2
    cg = _load(EXPORTED / "reflect_pad_image.onnx", {"image": [1, 3, 37, 50]})
    agree, measured = _static_vs_probe(cg)
    assert agree == measured > 30
    audio = EXPORTED / "reflect_pad_audio.onnx"
    sym = _load(audio)
    assert [str(r.macs_expr) for r in analyze(sym, rewrites=False)] == ["40*T", "192*T"]
    warning = next(w for w in sym.warnings if "If node" in w)
    assert "shape of input 'audio'" in warning and "--input-shape audio=1,1,?" in warning
    assert "--input-value" not in warning
    for length, taken in ((16000, "taken"), (3000, "not taken")):
        a = analyze(_load(audio, {"audio": [1, 1, length]}), rewrites=False)
        assert a.model["branches"]["//If:then_branch"] == taken
        assert a.totals["macs"] == 40 * length + 192 * length * (taken == "taken")
    code = main(["analyze", str(audio), "--input-shape", "audio=1,1,16000"])
    cap = capsys.readouterr()
    assert code == 0 and "If node" not in cap.err and "?" not in cap.out.split("memory and time")[0], cap


# ---- If conditions, input values, rank-0 inputs ---------------------------------------------------------
def _branching(cond_from_input: bool = True) -> onnx.ModelProto:
    """x [1,3,H,W]; if sr > 8000 (a rank-0 int64 input) a 3×3 conv, else a 1×1 conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(np.array(8000, np.int64), "limit")]
    then = helper.make_graph([helper.make_node("Conv", ["x", "wa"], ["ya"], name="big", pads=[1, 1, 1, 1])], "then",
                             [], [helper.make_tensor_value_info("ya", F, [1, 4, "H", "W"])])
    other = helper.make_graph([helper.make_node("Conv", ["x", "wb"], ["yb"], name="small")], "else", [],
                              [helper.make_tensor_value_info("yb", F, [1, 4, "H", "W"])])
    nodes = [helper.make_node("Greater", ["sr", "limit"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "branching", [helper.make_tensor_value_info("x", F, [1, 3, "H", "W"]),
                                                 helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", F, [1, 4, "H", "W"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_known_condition_takes_one_branch() -> None:
    cg = _load(_branching(), values={"sr": 16000})
    a = analyze(cg, rewrites=False)
    assert a.model["branches"] == {"/if:then_branch": "taken", "/if:else_branch": "not taken"}
    assert {r.name: str(r.macs_expr) for r in a} == {"big": "108*H*W", "small": "12*H*W"}  # both analyzed
    assert a.totals["macs_expr"] == "108*H*W" and cg.shape("y") == (1, 4, H, W)
    low = analyze(_load(_branching(), values={"sr": 4000}), rewrites=False)
    assert low.totals["macs_expr"] == "12*H*W" and low.model["branches"]["/if:else_branch"] == "taken"


def test_unknown_condition_names_the_input_that_decides_it() -> None:
    cg = _load(_branching())
    assert cg.undecided == [("", "if", ["sr"], [])]
    warning = next(w for w in cg.warnings if "If node" in w)
    assert "'sr'" in warning and "--input-value sr=V" in warning
    a = analyze(cg, rewrites=False)
    assert a.model["branches"] == {} and a.totals["macs_expr"] == "120*H*W"  # both counted


def test_input_values_reach_the_probe_and_every_input_set(tmp_path, capsys) -> None:
    path = tmp_path / "b.onnx"
    path.write_bytes(_branching().SerializeToString())
    code = main(["analyze", str(path), "--json", "--probe", "--input-shape", "x=1,3,8,8", "--input-value", "sr=16000",
                 "--input-shape", "sr="])
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert code == 0 and doc["totals"]["macs"] == 108 * 64 and "If node" not in cap.err, cap.err
    data = make_inputs(onnx.load(path), samples=2, input_shapes={"x": [1, 3, 8, 8]}, values={"sr": [16000]})
    assert all(s["sr"].shape == () and s["sr"].dtype == np.int64 and int(s["sr"]) == 16000 for s in data)
    assert "sr fixed by --input-value" in data.describe


def test_probe_failure_is_one_line_naming_the_input_value(tmp_path, capfd) -> None:
    m = _branching()
    m.graph.node[1].attribute[0].g.node[0].input[1] = "wb"  # the 3×3 branch now runs a 1×1 weight with 3×3 pads
    m.graph.node[1].attribute[0].g.node[0].attribute.append(helper.make_attribute("kernel_shape", [3, 3]))
    path = tmp_path / "bad.onnx"
    path.write_bytes(m.SerializeToString())
    cg = _load(path, {"x": [1, 3, 8, 8]}, values=None)
    with pytest.raises(ModelError, match="--input-value sr=V") as e:
        _probe_all(cg)
    assert "\n" not in str(e.value)
    assert capfd.readouterr().err == ""  # onnxruntime's own error log (written to fd 2) stays silent


def _probe_all(cg):
    names = [t for nid in cg.topological_order() for t in cg.graph.nodes[nid]["proto"].output if t]
    return probe_shapes(cg, names, seed=1)


def test_bad_input_values_are_usage_errors(models_dir) -> None:
    for values, needle in (({"nope": 1}, "not an input"), ({"x": [1, 2]}, "do not fill")):
        with pytest.raises(UsageError, match=needle):
            _load(models_dir / "dynamic.onnx", {"x": [1, 3, 4, 4]}, values)


def test_verify_and_bench_feed_input_values(tmp_path, capsys) -> None:
    """A rank-0 input with --input-value runs through verify and bench (rank-0 shapes were refused before)."""
    path = tmp_path / "b.onnx"
    path.write_bytes(_branching().SerializeToString())
    code = main(["verify", str(path), str(path), "--input-shape", "x=1,3,8,8", "--input-value", "sr=16000", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["passed"]
    code = main(["bench", str(path), "--input-shape", "x=1,3,8,8", "--input-value", "sr=3", "--runs", "2",
                 "--warmup", "1", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["models"][0]["runs"] == 2
    from convgraph.engine.verify import verify

    report = verify(path, path, input_shapes={"x": [1, 3, 8, 8], "sr": []}, values={"sr": 16000})
    assert report.passed


def _resized_then_branching() -> onnx.ModelProto:
    """x [1,3,8,8] → Resize by scales Sqrt([1,1,4,4]) (no value rule: its shape is lost) → conv "main"; an If on
    sr > 8000 runs conv "inner" on that conv's output resized again likewise, or passes it on."""
    return resized_if([helper.make_node("Sqrt", ["sq"], ["scales2"]),  # no value rule in the body either
                       helper.make_node("Resize", ["m", "", "scales2"], ["r2"], mode="nearest"),
                       helper.make_node("Conv", ["r2", "w2"], ["ya"], name="inner")], inner_kernel=1, add_main=False)


def test_unknown_shapes_warning_speaks_of_running_the_model_only_when_it_ran(tmp_path, capsys) -> None:
    """Without --probe the warning named what running the model cannot measure ("1 in If/Loop/Scan bodies,
    which running the model cannot measure"); it says so once --probe ran, and offers --probe for the
    main graph's convs only."""
    path = tmp_path / "r.onnx"
    path.write_bytes(_resized_then_branching().SerializeToString())
    base = ["analyze", str(path), "--input-value", "sr=16000", "--input-shape", "sr="]
    assert main(base) == 0
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if "with unknown shapes" in ln]
    assert "main in the main graph; inner in If/Loop/Scan bodies;" in warning and "could not measure" not in warning
    assert warning.endswith("to measure those of the main graph (onnxruntime exposes only main-graph tensors)")
    assert main([*base, "--probe"]) == 0
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if "with unknown shapes" in ln]
    assert warning.startswith("warning: 1 conv with unknown shapes") and "--probe (convgraph.load" not in warning
    assert "inner in If/Loop/Scan bodies, which running the model (--probe) could not measure" in warning


def test_a_second_rule_keeps_the_ifs_the_input_values_decide() -> None:
    """rewrite loads the model again for each rule: without the --input-value the If was undecided again, and
    a conv after it lost its shape (MACs '?') in the second rule's pass."""
    from convgraph.engine.rewrite import rewrite

    m = _branching()
    rng = np.random.default_rng(1)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w3"))
    m.graph.node.append(helper.make_node("Conv", ["y", "w3"], ["z"], name="after", pads=[0, 0, 0, 0]))
    then = next(a.g for a in m.graph.node[1].attribute if a.name == "then_branch")
    del then.node[0].attribute[:]  # the then branch's 3×3 conv unpadded: H-2; the else branch's 1×1: H
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", F, [1, 4, None, None]))
    report = rewrite(m, ["fold-bn", "separable"], input_shapes={"x": [1, 3, 16, 16], "sr": []},
                     input_options={"values": {"sr": 16000}}, dry_run=True).report
    after = next(c for c in report.changes if c.node == "after")
    assert after.macs_before == 4 * 4 * 9 * 12 * 12  # the then branch's 14×14, less 2: decided in both passes
