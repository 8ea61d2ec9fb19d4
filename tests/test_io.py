"""Safe model I/O: hostile files give one ModelError, external data stays in the model's folder, writes are atomic."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convgraph
import convgraph.io as cio
from helpers import external_weight
from convgraph import ModelError, UsageError


def _model(c: int = 8) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(c * c * 9, dtype=np.float32).reshape(c, c, 3, 3) / 100, "w")
    b = numpy_helper.from_array(np.ones(c, np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _load(source, **kw) -> convgraph.ConvGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convgraph.ConvGraphWarning)
        return convgraph.load(source, **kw)


def _external(tmp_path, location: str) -> tuple[Path, bytes]:
    """A model whose weight ``w`` lives at ``location`` (relative to the model's folder, or not), and that data."""
    return external_weight(_model(), tmp_path / "model", location)


def _loads_the_weight(path) -> None:
    t = _load(path).initializer("w")
    assert t is not None
    w = numpy_helper.to_array(t)
    assert np.array_equal(w, numpy_helper.to_array(_model().graph.initializer[0]))


# ---- unreadable files -------------------------------------------------------------------------
def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        _load(tmp_path / "nope.onnx")


def test_directory(tmp_path) -> None:
    with pytest.raises(ModelError, match="is a directory"):
        _load(tmp_path)


def test_empty_file(tmp_path) -> None:
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelError, match="empty file"):
        _load(p)


def test_fifo_is_not_read(tmp_path) -> None:
    p = tmp_path / "pipe.onnx"
    os.mkfifo(p)  # reading it would block forever
    with pytest.raises(ModelError, match="not a regular file"):
        _load(p)


@pytest.mark.parametrize("cut", [1, 2, 10, 50, 100, 500, -10, -1])
def test_truncated_file(tmp_path, cut: int) -> None:
    data = _model().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[:cut])
    with pytest.raises(ModelError, match=r"cut\.onnx"):
        _load(p)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(tmp_path, seed: int) -> None:
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError):
        _load(p)


def test_other_protobuf_is_not_a_model() -> None:
    t = numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString()
    with pytest.raises(ModelError, match="not an ONNX model|not a valid ONNX model"):
        _load(t)


def test_corrupted_models_only_ever_raise_model_error() -> None:
    """Flip bytes of a valid model at random: loading either works or raises one ModelError."""
    data = bytearray(_model().SerializeToString())
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        bad = bytearray(data)
        for i in rng.integers(0, len(bad), rng.integers(1, 4)):
            bad[i] = int(rng.integers(0, 256))
        try:
            _load(bytes(bad)).to_model()
            outcomes["ok"] += 1
        except ModelError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0  # the corruption is noticed, not silently accepted every time


def test_names_that_are_not_utf8() -> None:
    data = _model().SerializeToString()
    i = data.index(b"relu")
    bad = data[:i] + b"\xff\xfe" + data[i + 2:]  # protobuf parses it; the name comes back as bytes
    with pytest.raises(ModelError, match="not valid UTF-8"):
        _load(bad)


def test_not_a_source() -> None:
    with pytest.raises(UsageError, match="cannot load a model from"):
        _load(12)


# ---- absurd sizes -----------------------------------------------------------------------------
def test_tensor_claiming_1e11_elements_without_data() -> None:
    m = _model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend([100000, 1000, 1000, 1])
    with pytest.raises(ModelError, match="claims 1e\\+11 elements.*absurd"):
        _load(m)


def test_constant_attribute_claiming_1e11_elements() -> None:
    m = _model()
    t = TensorProto(name="k", data_type=TensorProto.FLOAT, dims=[10**11])
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=t))
    with pytest.raises(ModelError, match="absurd"):
        _load(m)


def test_raw_data_disagreeing_with_dims() -> None:
    m = _model()
    m.graph.initializer[1].raw_data = b"\0" * 12  # 3 floats for dims [8]
    with pytest.raises(ModelError, match="need 32 bytes, its raw data has 12"):
        _load(m)


def test_undefined_data_type() -> None:
    """data_type 99 passed the checker and reached numpy_helper in the rules ('Invalid tensor data type 99')."""
    m = _model()
    m.graph.initializer[1].data_type = 99
    with pytest.raises(ModelError, match="tensor 'b' has data type 99, which onnx does not define"):
        _load(m)


def test_dims_without_data() -> None:
    m = _model()
    m.graph.initializer[1].ClearField("raw_data")
    with pytest.raises(ModelError, match="holds no data"):
        _load(m)


def test_constant_of_shape_asking_for_1e11_elements_loads_without_allocating() -> None:
    """A valid model whose ConstantOfShape would make 400 GB: loading only reads the shape."""
    shape = numpy_helper.from_array(np.array([100000, 1000, 1, 1000], np.int64), "shape")
    g = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000, 8, 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100000, 8, 1])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cg = _load(m)
    assert cg.shape("w") == (100000, 1000, 1, 1000) and cg.shape("y") == (1, 100000, 8, 1)


# ---- external data ----------------------------------------------------------------------------
def test_external_data_inside_the_folder_loads(tmp_path) -> None:
    path, data = _external(tmp_path, "weights/w.bin")
    (path.parent / "weights").mkdir()
    (path.parent / "weights" / "w.bin").write_bytes(data)
    _loads_the_weight(path)


def test_external_data_symlink_inside_the_folder_is_fine(tmp_path) -> None:
    path, data = _external(tmp_path, "link.bin")
    (path.parent / "real.bin").write_bytes(data)
    (path.parent / "link.bin").symlink_to("real.bin")
    _loads_the_weight(path)


def test_external_data_absolute_path_refused(tmp_path) -> None:
    secret = tmp_path / "secret.bin"
    path, data = _external(tmp_path, str(secret))
    secret.write_bytes(data)
    with pytest.raises(ModelError, match="outside the model's folder; refused"):
        _load(path)


def test_external_data_dotdot_refused(tmp_path) -> None:
    path, data = _external(tmp_path, "../secret.bin")
    (tmp_path / "secret.bin").write_bytes(data)
    with pytest.raises(ModelError, match="outside the model's folder; refused"):
        _load(path)
    path, _ = _external(tmp_path, "sub/../../secret.bin")
    with pytest.raises(ModelError, match="outside the model's folder; refused"):
        _load(path)


def test_external_data_symlink_leading_out_refused(tmp_path) -> None:
    path, data = _external(tmp_path, "w.bin")
    (tmp_path / "secret.bin").write_bytes(data)
    (path.parent / "w.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelError, match="resolves outside the model's folder; refused"):
        _load(path)
    path, _ = _external(tmp_path, "dir/w.bin")  # a symlinked folder leading out
    (path.parent / "dir").symlink_to(tmp_path)
    (tmp_path / "w.bin").write_bytes(data)
    with pytest.raises(ModelError, match="resolves outside the model's folder; refused"):
        _load(path)


def test_external_data_hard_link_refused(tmp_path) -> None:
    """A hard link inside the folder to a file elsewhere reads like a plain file: refused by its link count."""
    path, data = _external(tmp_path, "w.bin")
    (tmp_path / "secret.bin").write_bytes(data)
    os.link(tmp_path / "secret.bin", path.parent / "w.bin")
    with pytest.raises(ModelError, match="'w.bin' has 2 hard links .*; refused"):
        _load(path)
    (tmp_path / "secret.bin").unlink()  # the last other name gone: the same file is fine
    _load(path)


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_external_data_link_leading_out_cli(tmp_path, capsys, how) -> None:
    from convgraph.cli import main

    path, data = _external(tmp_path, "w.bin")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(data)
    if how == "hardlink":
        os.link(secret, path.parent / "w.bin")
    else:
        (path.parent / "w.bin").symlink_to(secret)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convgraph: error: ") and err[0].endswith("refused"), err


def test_external_data_missing_file(tmp_path) -> None:
    path, _ = _external(tmp_path, "gone.bin")
    with pytest.raises(ModelError, match="needs external data file 'gone.bin', which is missing"):
        _load(path)


def test_external_data_file_too_short(tmp_path) -> None:
    path, data = _external(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(data[:100])
    with pytest.raises(ModelError, match="too short"):
        _load(path)


def test_external_data_bad_offset(tmp_path) -> None:
    path, data = _external(tmp_path, "w.bin")
    (path.parent / "w.bin").write_bytes(data)
    m = onnx.load(path, load_external_data=False)
    m.graph.initializer[0].external_data.add(key="offset", value="lots")
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="non-integer external data offset"):
        _load(path)


def test_external_data_from_bytes_is_refused(tmp_path) -> None:
    path, _ = _external(tmp_path, "w.bin")
    with pytest.raises(ModelError, match="load it from its file path"):
        _load(path.read_bytes())


# ---- writing ----------------------------------------------------------------------------------
def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    for victim in ("fsync", "replace"):
        with monkeypatch.context() as mp:
            mp.setattr(cio.os, victim, boom)
            with pytest.raises(OSError):
                cio.atomic_write_bytes(target, b"new" * 1000)
        assert target.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp file left behind
    cio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_save_failure_mid_write_keeps_the_old_model(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    convgraph.save(_load(_model()), target)
    before = target.read_bytes()
    monkeypatch.setattr(cio.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convgraph.save(_load(_model(4)), target)
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_written_files_get_normal_permissions(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        new = tmp_path / "new.onnx"
        convgraph.save(_model(), new)
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600
        old = tmp_path / "old.onnx"
        old.write_bytes(b"x")
        old.chmod(0o640)
        convgraph.save(_model(), old)
        assert stat.S_IMODE(old.stat().st_mode) == 0o640
    finally:
        os.umask(mask)


def test_output_naming_the_input_is_refused(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(_model().SerializeToString())
    before = src.read_bytes()
    with pytest.raises(UsageError, match="is the input model; refusing to overwrite it"):
        convgraph.save(_model(4), src, input_path=src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    with pytest.raises(UsageError, match="is the input model"):
        convgraph.save(_model(4), link, input_path=src)
    with pytest.raises(UsageError, match="is the input model"):
        convgraph.save(_model(4), tmp_path / "." / "m.onnx", input_path=str(src))
    assert src.read_bytes() == before
    convgraph.save(_model(4), src, input_path=src, in_place=True)
    assert src.read_bytes() == _model(4).SerializeToString()


def test_bad_output_paths(tmp_path) -> None:
    with pytest.raises(UsageError, match="output folder does not exist"):
        cio.check_output_path(tmp_path / "no" / "m.onnx")
    with pytest.raises(UsageError, match="is a directory"):
        cio.check_output_path(tmp_path)
    assert cio.check_output_path(str(tmp_path / "m.onnx")) == tmp_path / "m.onnx"


def test_write_output_never_over_an_input(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model")
    link = tmp_path / "hard.dot"
    os.link(src, link)
    for target in (src, link, tmp_path / "." / "m.onnx"):
        with pytest.raises(UsageError, match="^--dot: .* is the input model; refusing to overwrite it$"):
            cio.write_output(target, "digraph {}", src, flag="--dot")
    with pytest.raises(UsageError, match=f"m.onnx is the same file as {src}; refusing"):  # any of several paths
        cio.write_output(tmp_path / "m.onnx", b"x", [tmp_path / "calib.npz", src], flag="--plot")
    assert src.read_bytes() == b"model"
    out = cio.write_output(tmp_path / "g.dot", "digraph {}", src)
    assert out.read_text() == "digraph {}" and sorted(p.name for p in tmp_path.iterdir()) == ["g.dot", "hard.dot", "m.onnx"]


def test_analyze_dot_never_overwrites_the_model(tmp_path, capsys) -> None:
    from convgraph.cli import main

    src = tmp_path / "m.onnx"
    src.write_bytes(_model().SerializeToString())
    before = src.read_bytes()
    assert main(["analyze", str(src), "--dot", str(src)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip().splitlines() == [
        f"convgraph: error: --dot: {src} is the input model; refusing to overwrite it"]
    assert src.read_bytes() == before
    assert main(["analyze", str(src), "--dot", str(tmp_path / "m.dot")]) == 0
    assert (tmp_path / "m.dot").read_text().startswith("digraph") and src.read_bytes() == before


def test_iter_tensors_sees_every_tensor() -> None:
    body = helper.make_graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(1), "in_body"))],
                             "b", [], [helper.make_tensor_value_info("k", TensorProto.FLOAT, [])],
                             [numpy_helper.from_array(np.float32(2), "body_init")])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "sp_v"),
                                       numpy_helper.from_array(np.array([0], np.int64), "sp_i"), [3])
    fn = helper.make_function("f", "F", ["a"], ["b"], [helper.make_node(
        "Constant", [], ["b"], value=numpy_helper.from_array(np.float32(3), "in_fn"))], [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("If", ["c"], ["k"], then_branch=body, else_branch=body)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("k", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(np.float32(0), "main")], sparse_initializer=[sparse])
    m = helper.make_model(g, functions=[fn])
    names = sorted(t.name for t in cio.iter_tensors(m))
    assert names == sorted(["main", "sp_v", "sp_i", "in_fn", "body_init", "in_body", "body_init", "in_body"])
