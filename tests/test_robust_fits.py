"""Degenerate data never crashes a rewrite: singular fits fall back, non-finite weights skip the conv with its
reason, and whatever else goes wrong is one line on stderr (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import convgraph.cli.analyze as cli_analyze
from convgraph import fit
from convgraph.cli import main

NAN_CONV = "block1/conv"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "LinAlgError" not in err, err


@pytest.fixture
def one_image(tmp_path) -> Path:
    skimage = pytest.importorskip("skimage")
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(Path(skimage.__file__).parent / "data" / "astronaut.png", folder)
    return folder


def _with_nan_weights(models_dir: Path, tmp_path: Path, value: float = np.nan) -> Path:
    """models/sample.onnx with one weight of ``block1/conv`` set to ``value``."""
    m = onnx.load(str(models_dir / "sample.onnx"))
    node = next(n for n in m.graph.node if n.name == NAN_CONV)
    init = next(i for i in m.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[3] = value
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    p = tmp_path / "nan.onnx"
    onnx.save(m, str(p))
    return p


def test_solve_falls_back_on_singular_matrices() -> None:
    a = np.stack([np.zeros((3, 3)), np.diag([1.0, 2.0, 0.0]), np.eye(3) * 2])
    b = np.ones((3, 3, 2))
    x = fit.solve(a, b)
    assert np.all(x[0] == 0)  # least-norm solution of 0·x = 1
    np.testing.assert_allclose(x[1], np.array([[1, 1], [0.5, 0.5], [0, 0]]))
    np.testing.assert_allclose(x[2], 0.5)


def test_spatial_separable_calibrated_on_one_image(models_dir, one_image, tmp_path, capsys) -> None:
    """One calibration image leaves dead channels: ALS met a zero system and raised 'Singular matrix'."""
    out = tmp_path / "x.onnx"
    code, _, err = _cli(capsys, "rewrite", models_dir / "sample.onnx", "--rule", "spatial-separable",
                        "--calib", one_image, "-o", out, "--no-bench", "--json")
    _no_traceback(err)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("rule", ["separable", "spatial-separable", "low-rank"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_skip_the_conv(models_dir, tmp_path, capsys, rule, value) -> None:
    model = _with_nan_weights(models_dir, tmp_path, value)
    code, out, err = _cli(capsys, "rewrite", model, "--rule", rule, "--nodes", "^block1/conv$", "-o",
                          tmp_path / "o.onnx", "--no-bench", "--json")
    _no_traceback(err)
    assert code == 1, err  # the only conv matched failed: a failure, not "nothing matched"; nothing written
    report = json.loads(out)
    assert report["changes"] == [] and not report["passed"] and report["output"] is None
    assert not (tmp_path / "o.onnx").exists()
    (skip,) = [e for e in report["explain"] if e["skipped"]]
    assert skip["node"] == NAN_CONV and "not finite" in skip["reason"] and NAN_CONV in skip["reason"]
    assert "nothing rewritten: every conv the rules matched was skipped" in err
    assert any("nothing rewritten" in f for f in report["failures"])
    code, out, err = _cli(capsys, "rewrite", model, "--rule", rule, "--nodes", "^block1/conv$", "-o",
                          tmp_path / "o.onnx", "--no-bench", "--keep-failed")
    assert code == 1 and not (tmp_path / "o.onnx").exists()  # --keep-failed keeps a failed rewrite, not a copy
    assert f"{rule}: none of 8 convs rewritten: skipped: weights of node '{NAN_CONV}' are not finite" in " ".join(
        out.split()), out
    assert err.strip().splitlines()[-1].startswith("convgraph: nothing rewritten: every conv the rules matched")


def test_non_finite_weights_other_convs_still_rewritten(models_dir, tmp_path, capsys) -> None:
    model = _with_nan_weights(models_dir, tmp_path)
    code, out, err = _cli(capsys, "rewrite", model, "--rule", "separable", "-o", tmp_path / "o.onnx",
                          "--no-verify", "--no-bench", "--json")
    _no_traceback(err)
    assert code == 0, err
    report = json.loads(out)
    assert NAN_CONV not in [c["node"] for c in report["changes"]] and len(report["changes"]) >= 3
    assert "1 conv(s) skipped" in err


def test_calibration_activations_not_finite_skip(models_dir, one_image, tmp_path, capsys) -> None:
    """Downstream of a NaN conv every activation is NaN: the data fits skip those convs, naming why."""
    model = _with_nan_weights(models_dir, tmp_path)
    code, out, err = _cli(capsys, "rewrite", model, "--rule", "spatial-separable", "--calib", one_image,
                          "--exclude", "^block1/conv$", "-o", tmp_path / "o.onnx", "--no-verify", "--no-bench",
                          "--json")
    _no_traceback(err)
    assert code == 0, err
    reasons = [e["reason"] for e in json.loads(out)["explain"] if e["skipped"]]
    assert reasons and all("calibration activations" in r and "not finite" in r for r in reasons)


def _boom(*a, **k):
    raise RuntimeError("something nobody foresaw\nsecond line")


def test_unexpected_error_is_one_line(models_dir, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_analyze, "run_analysis", _boom)
    monkeypatch.delenv("CONVGRAPH_DEBUG", raising=False)
    code, out, err = _cli(capsys, "analyze", models_dir / "sample.onnx")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convgraph: error: unexpected RuntimeError: something nobody foresaw second line")
    assert "--debug" in lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(models_dir, capsys, monkeypatch, how) -> None:
    monkeypatch.setattr(cli_analyze, "run_analysis", _boom)
    argv = ["analyze", str(models_dir / "sample.onnx")]
    if how == "flag":
        monkeypatch.delenv("CONVGRAPH_DEBUG", raising=False)
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("CONVGRAPH_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(argv)
    monkeypatch.delenv("CONVGRAPH_DEBUG", raising=False)
    assert main(["analyze", str(models_dir / "sample.onnx")]) == 2  # --debug does not stick to the next run


def _set(node: onnx.NodeProto, name: str, value) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value, attr_type=onnx.AttributeProto.INTS if value == [] else None))


def test_onnxruntime_failure_is_one_line(models_dir, tmp_path) -> None:
    """onnxruntime logged its own error line on stderr (fd 2, past Python) before convgraph's."""
    import subprocess
    import sys

    m = onnx.load(str(models_dir / "constant_weights.onnx"))
    node = next(n for n in m.graph.node if n.name == "conv_c/W_dequant")
    _set(node, "axis", 2**40)  # the checker takes it; onnxruntime fails
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    done = subprocess.run([str(Path(sys.executable).with_name("convgraph")), "verify", str(path), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("convgraph: error: onnxruntime failed to run the model")


def test_group_not_dividing_the_channels(models_dir, tmp_path, capsys) -> None:
    """group 2^62 on a ConvTranspose: the sub-pixel and resize rules reshaped its weight into 2^62 groups."""
    m = onnx.load(str(models_dir / "transposed.onnx"))
    node = next(n for n in m.graph.node if n.name == "up_k2s2")
    _set(node, "group", 2**62)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    for rule in ("transpose-subpixel", "transpose-resize"):
        code, out, err = _cli(capsys, "rewrite", path, "--rule", rule, "--nodes", "^up_k2s2$", "--dry-run", "--explain")
        assert code == 0 and "does not divide the channels" in out, out
        code, out, err = _cli(capsys, "rewrite", path, "--rule", rule, "--nodes", "^up_k2s2$", "-o",
                              tmp_path / "o.onnx", "--no-bench")  # the full checker refuses the model itself
        assert code in (1, 2) and "unexpected" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("rule", ["separable", "spatial-separable", "low-rank"])
def test_empty_pads_attribute_means_the_default(models_dir, tmp_path, capsys, rule) -> None:
    """pads=[] (legal: no pads) was copied to the new nodes: make_node failed, the 4-way unpack too."""
    m = onnx.load(str(models_dir / "grouped.onnx"))
    node = next(n for n in m.graph.node if n.name == "gconv3x3_g4")
    _set(node, "pads", [])  # its output shrinks from 16×16 to 14×14: drop the shapes stored for 16
    del m.graph.value_info[:]
    for o in m.graph.output:
        for i, d in enumerate(o.type.tensor_type.shape.dim):
            d.dim_param = f"d{i}"
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    code, out, err = _cli(capsys, "rewrite", path, "--rule", rule, "--nodes", "^gconv3x3_g4$", "-o",
                          tmp_path / "o.onnx", "--no-bench", "--no-verify", "--json")  # onnxruntime refuses pads=[]
    assert code == 0, err
    assert [c["node"] for c in json.loads(out)["changes"]] == ["gconv3x3_g4"]


def test_full_check_value_error_is_one_line(models_dir, tmp_path, capsys) -> None:
    """Cast to=0 passes the loader's checker; the full check of the result raised a bare ValueError."""
    m = onnx.load(str(models_dir / "quantized.onnx"))
    _set(next(n for n in m.graph.node if n.op_type == "Cast"), "to", 0)
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    code, _, err = _cli(capsys, "rewrite", path, "--rule", "fold-bn", "-o", tmp_path / "o.onnx", "--no-bench")
    assert code == 1 and err.startswith("convgraph: error: rewritten model fails onnx.checker: "), err
    assert len(err.strip().splitlines()) == 1
