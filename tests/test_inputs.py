"""Input sets: random (seeded, dtype-aware), .npz with a leading axis of samples, image folders."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convgraph.errors import ModelError, UsageError
from convgraph.run.inputs import MAX_INPUT_BYTES, InputSpec, input_specs, make_inputs, resolve_shape


def _model(inputs: list[tuple[str, int, list]]) -> onnx.ModelProto:
    """A model passing each input through Identity (the inputs are what matters here)."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    g = helper.make_graph(nodes, "m", vis, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_specs_skip_initializer_inputs():
    m = _model([("x", TensorProto.FLOAT, [1, 3])])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    m.graph.initializer.append(w)
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    assert [s.name for s in input_specs(m)] == ["x"]


def test_random_inputs_are_seeded_and_dtype_aware():
    m = _model([("f", TensorProto.FLOAT, [2, 3]), ("h", TensorProto.FLOAT16, [4]), ("u8", TensorProto.UINT8, [500]),
                ("i64", TensorProto.INT64, [50]), ("b", TensorProto.BOOL, [100])])
    a, b, c = make_inputs(m, samples=2, seed=7), make_inputs(m, samples=2, seed=7), make_inputs(m, samples=2, seed=8)
    assert len(a) == 2
    s0 = a[0]
    assert {k: v.dtype for k, v in s0.items()} == {"f": np.float32, "h": np.float16, "u8": np.uint8,
                                                   "i64": np.int64, "b": np.bool_}
    assert s0["f"].shape == (2, 3) and 0 <= s0["f"].min() and s0["f"].max() < 1
    assert s0["u8"].max() > 200  # the whole 8-bit range is used
    assert 0 <= s0["i64"].min() and s0["i64"].max() < 10
    assert s0["b"].any() and not s0["b"].all()
    for k in s0:
        np.testing.assert_array_equal(s0[k], b[0][k])  # same seed, same values
    assert not np.array_equal(a[0]["f"], a[1]["f"])  # samples differ
    assert not np.array_equal(a[0]["f"], c[0]["f"])  # seeds differ
    np.testing.assert_array_equal(a[1]["f"], a[-1]["f"])


def test_dynamic_dims_need_input_shape():
    m = _model([("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    with pytest.raises(UsageError, match=r"--input-shape x=1,3,D2,D3"):
        make_inputs(m)
    data = make_inputs(m, input_shapes={"x": [2, 3, 8, 5]})
    assert data[0]["x"].shape == (2, 3, 8, 5)
    with pytest.raises(UsageError, match="fixed to 3"):
        make_inputs(m, input_shapes={"x": [1, 4, 8, 8]})
    with pytest.raises(UsageError, match="has 3 dims"):
        make_inputs(m, input_shapes={"x": [1, 3, 8]})


def test_absurd_sizes_are_refused_before_allocation():
    spec = InputSpec("x", TensorProto.FLOAT, ("N", 3, "H", "W"))
    with pytest.raises(UsageError, match="refused"):
        resolve_shape(spec, {"x": [1, 3, 100_000, 100_000]})
    assert resolve_shape(spec, {"x": [1, 3, 1000, 1000]}) == (1, 3, 1000, 1000)  # 12 MB is fine
    assert 4 * 3 * 100_000 * 100_000 > MAX_INPUT_BYTES


def test_samples_must_be_positive():
    with pytest.raises(UsageError, match="at least 1"):
        make_inputs(_model([("x", TensorProto.FLOAT, [1])]), samples=0)


def test_npz_leading_axis_of_samples(tmp_path):
    m = _model([("x", TensorProto.FLOAT, [1, 3, 4, 4]), ("k", TensorProto.INT64, [2])])
    x = np.random.default_rng(0).random((5, 1, 3, 4, 4))  # float64: cast to the model's float32
    k = np.arange(10).reshape(5, 2)
    np.savez(tmp_path / "d.npz", x=x, k=k)
    data = make_inputs(m, tmp_path / "d.npz")
    assert len(data) == 5
    assert data[3]["x"].dtype == np.float32 and data[3]["x"].shape == (1, 3, 4, 4)
    np.testing.assert_allclose(data[3]["x"], x[3].astype(np.float32))
    np.testing.assert_array_equal(data[4]["k"], [8, 9])
    assert len(make_inputs(m, tmp_path / "d.npz", samples=2)) == 2


def test_npz_batch_axis_split_into_samples(tmp_path):
    m = _model([("x", TensorProto.FLOAT, [2, 3])])
    x = np.arange(36, dtype=np.float32).reshape(6, 6)[:, :3]
    np.savez(tmp_path / "d.npz", x=x)
    data = make_inputs(m, str(tmp_path / "d.npz"))
    assert len(data) == 3
    np.testing.assert_array_equal(data[1]["x"], x[2:4])


def test_npz_one_sample_fits_dynamic_dims(tmp_path):
    m = _model([("x", TensorProto.FLOAT, ["N", 3])])
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3), np.float32))
    data = make_inputs(m, tmp_path / "d.npz")
    assert len(data) == 1 and data[0]["x"].shape == (4, 3)


def test_npz_missing_input_is_named(tmp_path):
    m = _model([("images", TensorProto.FLOAT, [1, 3]), ("scale", TensorProto.FLOAT, [1])])
    np.savez(tmp_path / "d.npz", images=np.ones((1, 3), np.float32), other=np.ones(2))
    with pytest.raises(ModelError, match=r"no array for input 'scale'.*'images', 'other'"):
        make_inputs(m, tmp_path / "d.npz")


def test_npz_bad_shapes_counts_and_types(tmp_path):
    m = _model([("x", TensorProto.FLOAT, [1, 3]), ("y", TensorProto.FLOAT, [1, 3])])
    np.savez(tmp_path / "shape.npz", x=np.ones((1, 4)), y=np.ones((1, 3)))
    with pytest.raises(ModelError, match=r"'x' has shape \[1, 4\]"):
        make_inputs(m, tmp_path / "shape.npz")
    np.savez(tmp_path / "count.npz", x=np.ones((2, 1, 3)), y=np.ones((3, 1, 3)))
    with pytest.raises(ModelError, match="different numbers of samples"):
        make_inputs(m, tmp_path / "count.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.ones((1, 3)))
    with pytest.raises(ModelError, match="Python objects"):
        make_inputs(m, tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable .npz"):
        make_inputs(m, tmp_path / "junk.npz")
    with pytest.raises(UsageError, match="no such file"):
        make_inputs(m, tmp_path / "missing.npz")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UsageError, match=".npz file or a folder"):
        make_inputs(m, tmp_path / "a.txt")


def test_dicts_and_lists_of_dicts():
    m = _model([("x", TensorProto.FLOAT, [1, 2])])
    data = make_inputs(m, {"x": np.zeros((3, 1, 2))})
    assert len(data) == 3
    data = make_inputs(m, [{"x": np.zeros((1, 2))}, {"x": np.ones((1, 2))}])
    assert len(data) == 2 and data[1]["x"].dtype == np.float32 and data[1]["x"].sum() == 2
    with pytest.raises(ModelError, match="is float32, the model's input is int64"):
        make_inputs(_model([("i", TensorProto.INT64, [2])]), {"i": np.zeros(2, np.float32)})


def _images(folder, n: int, size=(20, 30)):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=size + (3,), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_image_folder_resized_and_normalized(tmp_path):
    pytest.importorskip("PIL")
    folder = _images(tmp_path / "imgs", 3)
    m = _model([("x", TensorProto.FLOAT, [1, 3, 16, 12])])
    data = make_inputs(m, folder, mean=[0.5], std=[0.25])
    assert len(data) == 3
    x = data[0]["x"]
    assert x.shape == (1, 3, 16, 12) and x.dtype == np.float32
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6  # (p/255 - 0.5) / 0.25
    from PIL import Image

    with Image.open(folder / "img0.png") as im:
        expected = np.asarray(im.convert("RGB").resize((12, 16), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(x[0], ((expected / 255 - 0.5) / 0.25).transpose(2, 0, 1), rtol=1e-6)
    nhwc = make_inputs(_model([("x", TensorProto.FLOAT, [1, "H", "W", 3])]), folder, image_size=[16, 12],
                       mean=[0.5], std=[0.25], layout="nhwc")
    np.testing.assert_allclose(nhwc[0]["x"][0], x[0].transpose(1, 2, 0))


def test_image_folder_batches_and_errors(tmp_path):
    pytest.importorskip("PIL")
    folder = _images(tmp_path / "imgs", 5)
    with pytest.warns(UserWarning, match="left over"):
        data = make_inputs(_model([("x", TensorProto.FLOAT, [2, 3, 8, 8])]), folder)
    assert len(data) == 2 and data[1]["x"].shape == (2, 3, 8, 8)
    dyn = _model([("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    with pytest.raises(UsageError, match="--image-size"):
        make_inputs(dyn, folder)
    assert make_inputs(dyn, folder, image_size=[10])[0]["x"].shape == (1, 3, 10, 10)
    with pytest.raises(UsageError, match="one input"):
        make_inputs(_model([("a", TensorProto.FLOAT, [1, 3, 8, 8]), ("b", TensorProto.FLOAT, [1])]), folder)
    with pytest.raises(UsageError, match="--mean takes 1 or 3"):
        make_inputs(_model([("x", TensorProto.FLOAT, [1, 3, 8, 8])]), folder, mean=[0.1, 0.2])
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ModelError, match="broken.png: cannot read image"):
        list(make_inputs(_model([("x", TensorProto.FLOAT, [1, 3, 8, 8])]), folder))


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError, match=r"pip install 'convgraph\[images\]'"):
        make_inputs(_model([("x", TensorProto.FLOAT, [1, 3, 8, 8])]), folder)


def test_npz_absurd_array_refused_from_its_header(tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (100_000, 100_000)})
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue())  # a header only: nothing of 40 GB exists
    with pytest.raises(ModelError, match="GiB; refused"):
        make_inputs(_model([("x", TensorProto.FLOAT, ["N", 100_000])]), tmp_path / "big.npz")


@pytest.mark.parametrize("dtype", [np.bool_, np.float32, np.int64, np.uint8])
def test_random_values_of_a_scalar_input_are_arrays(dtype):
    """An If's condition as a graph input (shape []): onnxruntime takes a 0-d array, not a numpy scalar."""
    from convgraph.run.inputs import random_array

    v = random_array(np.random.default_rng(0), (), np.dtype(dtype))
    assert isinstance(v, np.ndarray) and v.shape == () and v.dtype == np.dtype(dtype)


def test_arrays_split_into_samples_by_the_input_shape_the_user_fixed(tmp_path):
    """A model of dynamic batch: a [6,3,4,4] array is one batch of 6 as it stands, and 6 samples once the user
    fixes the input at [1,3,4,4] (--input-shape), as the optimizer needs its samples one by one."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    arr = np.random.default_rng(0).random((6, 3, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=arr)
    for inputs in (tmp_path / "a.npz", {"x": arr}):
        assert len(make_inputs(model, inputs)) == 1
        fixed = make_inputs(model, inputs, input_shapes={"x": [1, 3, 4, 4]})
        assert len(fixed) == 6 and fixed[4]["x"].shape == (1, 3, 4, 4)
        assert np.array_equal(fixed[4]["x"][0], arr[4])
