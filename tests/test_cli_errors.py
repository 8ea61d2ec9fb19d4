"""Bad input on the command line: one clear line on stderr and exit 2, never a traceback or a MemoryError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import external_weight, run_cli, write_model

BIN = Path(sys.executable).with_name("convgraph")


def _model(dynamic: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.linspace(-1, 1, 4 * 3 * 9, dtype=np.float32).reshape(4, 3, 3, 3), "w")
    shape: list[str | int] = ["N", 3, "H", "W"] if dynamic else [1, 3, 16, 16]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"] if dynamic else [1, 4, 16, 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "MemoryError" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convgraph: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


# ---- files that are not usable models ---------------------------------------------------------
def _truncated(tmp: Path) -> Path:
    p = tmp / "cut.onnx"
    p.write_bytes(_model().SerializeToString()[:57])
    return p


def _random(tmp: Path) -> Path:
    p = tmp / "random.onnx"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return p


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.onnx"
    p.write_bytes(b"")
    return p


def _directory(tmp: Path) -> Path:
    (tmp / "folder.onnx").mkdir()
    return tmp / "folder.onnx"


def _missing(tmp: Path) -> Path:
    return tmp / "missing.onnx"


def _absurd(tmp: Path) -> Path:
    m = _model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend([10**5, 10**3, 10**3, 1])  # 10^11 elements, no data
    return write_model(tmp, m, "absurd.onnx")


def _external(tmp: Path, location: str) -> Path:
    path, data = external_weight(_model(), tmp / "model", location)
    (tmp / "secret.bin").write_bytes(data)
    return path


def _ext_absolute(tmp: Path) -> Path:
    return _external(tmp, str(tmp / "secret.bin"))


def _ext_dotdot(tmp: Path) -> Path:
    return _external(tmp, "../secret.bin")


def _ext_symlink(tmp: Path) -> Path:
    p = _external(tmp, "w.bin")
    (p.parent / "w.bin").symlink_to(tmp / "secret.bin")
    return p


def _ext_missing(tmp: Path) -> Path:
    return _external(tmp, "gone.bin")


BAD_FILES = {
    "truncated": (_truncated, "truncated or corrupt"),
    "random": (_random, "random.onnx"),
    "empty": (_empty, "empty file"),
    "directory": (_directory, "is a directory"),
    "missing": (_missing, "no such file"),
    "absurd-dims": (_absurd, "absurd"),
    "external-absolute": (_ext_absolute, "outside the model's folder; refused"),
    "external-dotdot": (_ext_dotdot, "outside the model's folder; refused"),
    "external-symlink-out": (_ext_symlink, "resolves outside the model's folder; refused"),
    "external-missing": (_ext_missing, "'gone.bin', which is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_model_file(tmp_path, capsys, case: str) -> None:
    make, needle = BAD_FILES[case]
    path = make(tmp_path)
    code, out, err = run_cli(capsys, "analyze", path)
    _assert_one_error(code, err, needle)
    assert out == ""


def test_constant_of_shape_asking_for_1e11_elements_does_not_allocate(tmp_path, capsys) -> None:
    """A valid model whose conv weight is ConstantOfShape([10^5, 10^3, 1, 10^3]): 400 GB if materialized."""
    shape = numpy_helper.from_array(np.array([10**5, 10**3, 1, 10**3], np.int64), "shape")
    g = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000, 8, 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100000, 8, 1])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    code, out, err = run_cli(capsys, "analyze", write_model(tmp_path, m), "--json")
    assert "Traceback" not in err and "MemoryError" not in err and "out of memory" not in err
    if code == 2:
        _assert_one_error(code, err)
    else:
        assert code == 0 and '"conv"' in out


# ---- --input-shape ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, needle", [
    ("x=", "has 0 dims, the model's input has 4"),  # rank 0: a scalar input
    ("x=0,3", "between 1 and"),
    ("x=-1", "between 1 and"),
    ("x=a,b", "has 2 dims, the model's input has 4"),  # names are symbols
    ("x=1,3,a b,4", "bad --input-shape"),
    ("x=1,,3,4", "bad --input-shape"),
    ("=1,3,8,8", "bad --input-shape"),
    ("x", "bad --input-shape 'x'"),
    ("x=99999999999999999999", "between 1 and"),
    ("nope=1,3,8,8", "'nope', not an input of the model (inputs: x)"),
    ("x=1,3,8", "has 3 dims, the model's input has 4"),
    ("x=1,4,8,8", "dim 1 is fixed to 3"),
])
def test_bad_input_shape(tmp_path, capsys, value: str, needle: str) -> None:
    path = write_model(tmp_path, _model(dynamic=True))
    code, out, err = run_cli(capsys, "analyze", path, "--input-shape", value)
    _assert_one_error(code, err, needle)


def test_good_input_shape_and_the_dynamic_warning(tmp_path, capsys) -> None:
    path = write_model(tmp_path, _model(dynamic=True))
    code, out, err = run_cli(capsys, "analyze", path, "--input-shape", "x=1,3,32,32", "--json")
    assert code == 0 and "warning" not in err, err
    code, out, err = run_cli(capsys, "analyze", path, "--json")
    assert code == 0
    warnings = [line for line in err.splitlines() if "dynamic input dims" in line]
    assert len(warnings) == 1 and "x [N,3,H,W]" in warnings[0] and "--input-shape" in warnings[0]


@pytest.mark.parametrize("argv", [
    ["analyze", "{m}", "--profile", "--runs", "1"], ["analyze", "{m}", "--plot", "{tmp}/top.png"],
    ["rewrite", "{m}", "--rule", "separable", "--param", "rank=full", "-o", "{tmp}/o.onnx"],
    ["rewrite", "{m}", "--rule", "separable", "--dry-run", "--profile"], ["verify", "{m}", "{m}"], ["bench", "{m}"],
    ["optimize", "{m}", "--calib", "{tmp}", "-o", "{tmp}/o.onnx"], ["analyze", "{m}", "--probe"],
])
def test_named_dims_in_a_command_that_runs_the_model(tmp_path, capsys, argv: list) -> None:
    """x=N,3,H,W names symbols for the static analysis; a command that runs the model asks for integers in
    one line (it once failed with "invalid literal for int()"), and writes nothing."""
    path = write_model(tmp_path, _model(dynamic=True))
    argv = [a.format(m=path, tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, *argv, "--input-shape", "x=N,3,H,W")
    _assert_one_error(code, err, "--input-shape x=", "integer")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "top.png").exists()


def test_named_dims_given_on_purpose_do_not_warn(tmp_path, capsys) -> None:
    path = write_model(tmp_path, _model(dynamic=True))
    for argv in (["analyze", path], ["rewrite", path, "--rule", "separable", "--dry-run"]):
        code, out, err = run_cli(capsys, *argv, "--input-shape", "x=1,3,H,W")
        assert code == 0 and "warning" not in err, (out, err)
    assert "108·H·W" in run_cli(capsys, "analyze", path, "--input-shape", "x=1,3,H,W")[1]


# ---- outputs ----------------------------------------------------------------------------------
def test_output_naming_the_input_is_refused_unless_in_place(tmp_path, capsys) -> None:
    path = write_model(tmp_path, _model())
    before = path.read_bytes()
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--no-bench", "-o", path)
    _assert_one_error(code, err, "is the input model", "--in-place")
    assert path.read_bytes() == before
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--no-bench", "-o", link)
    _assert_one_error(code, err, "is the input model")
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--param", "rank=full", "--no-bench",
                          "-o", path, "--in-place")
    assert code == 0, err
    assert path.read_bytes() != before and onnx.load(path).graph.node  # rewritten in place


def test_output_in_a_missing_folder(tmp_path, capsys) -> None:
    path = write_model(tmp_path, _model())
    code, out, err = run_cli(capsys, "rewrite", path, "--rule", "separable", "--no-bench", "-o", tmp_path / "no" / "o.onnx")
    _assert_one_error(code, err, "output folder does not exist")


# ---- the real program -------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["truncated", "absurd-dims", "external-symlink-out"])
def test_the_installed_command_exits_2_without_traceback(tmp_path, case: str) -> None:
    path = BAD_FILES[case][0](tmp_path)
    r = subprocess.run([str(BIN), "analyze", str(path)], capture_output=True, text=True, timeout=120)
    _assert_one_error(r.returncode, r.stderr, BAD_FILES[case][1])
    assert r.stdout == ""


def test_bad_input_shape_in_the_installed_command(tmp_path) -> None:
    path = write_model(tmp_path, _model(dynamic=True))
    r = subprocess.run([str(BIN), "analyze", str(path), "--input-shape", "x=-1"], capture_output=True, text=True,
                       timeout=120)
    _assert_one_error(r.returncode, r.stderr, "--input-shape")


def test_import_and_cli_start_without_heavy_modules() -> None:
    """``import convgraph`` and the CLI (all commands registered) must not import onnxruntime & co."""
    code = ("import sys, convgraph, convgraph.cli; "
            "heavy = [m for m in ('onnxruntime', 'scipy', 'skimage', 'PIL', 'onnx_tool', 'matplotlib', 'torch') "
            "if m in sys.modules]; print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
    r = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "analyze" in r.stdout
