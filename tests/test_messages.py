"""What a new user reads when something is off: one-line usage errors, --param values that say what is valid,
numpy's warnings with where they arose, verdict lines that do not stutter, a speed-up that agrees with the
times shown, text that uses a wide pipe's width."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.run.bench import BenchReport, ModelTiming, PairRatio
from helpers import run_cli, write_model

F = TensorProto.FLOAT


def _one_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("convgraph: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "{m}", "--foo"], "No such option '--foo'"),
    (["analyzee", "{m}"], "No such command 'analyzee'"),
    (["analyze"], "Missing argument 'MODEL'"),
    (["analyze", "{m}", "--sort", "size"], "'size' is not one of"),
    (["verify", "{m}"], "Missing argument 'CANDIDATE'"),
])
def test_usage_errors_are_one_line(models_dir, capsys, argv, needle) -> None:
    argv = [a.format(m=models_dir / "sample.onnx") for a in argv]
    line = _one_line(*run_cli(capsys, *argv)[::2], needle)
    assert "-h for help" in line


def test_usage_error_in_the_installed_command_is_one_line(models_dir) -> None:
    r = subprocess.run([sys.executable, "-m", "convgraph", "rewrite", str(models_dir / "sample.onnx"), "--rulez", "x"],
                       capture_output=True, text=True, timeout=120)
    _one_line(r.returncode, r.stderr, "No such option '--rulez'", "convgraph rewrite -h for help")


@pytest.mark.parametrize("param, needle", [
    ("rank=fulll", "bad value 'fulll' for --param rank: must be a positive integer or 'full' (default 1)"),
    ("rank=0", "must be a positive integer or 'full'"),
    ("fit=foo", "must be 'data' or 'weights'"),
    ("share=2", "--param share: not a parameter of separable (parameters: separable: rank, fit, response, layout)"),
])
def test_param_errors_name_the_valid_values(models_dir, capsys, param, needle) -> None:
    code, out, err = run_cli(capsys, "rewrite", models_dir / "sample.onnx", "--rule", "separable", "--param", param,
                             "--dry-run")
    line = _one_line(code, err, needle)
    assert "invalid literal" not in line


def test_a_param_parser_without_its_own_message_shows_the_param_help(models_dir, capsys) -> None:
    code, out, err = run_cli(capsys, "rewrite", models_dir / "sample.onnx", "--rule", "transpose-resize", "--param",
                             "correlation=x", "--dry-run")
    _one_line(code, err, "bad value 'x' for --param correlation: correlation is data-free fit", "(default 0.9)")


def _sigmoid_model(scale: float, offset: float = 0.0) -> onnx.ModelProto:
    """x [1,3,16,16] → Conv 1×1 → Mul(scale) → Sigmoid (+ offset): onnx.reference's Sigmoid overflows numpy's
    exp."""
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    s = numpy_helper.from_array(np.array(scale, np.float32), "s")
    o = numpy_helper.from_array(np.array(offset, np.float32), "o")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                           helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Sigmoid", ["m"], ["g"]),
                           helper.make_node("Add", ["g", "o"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", F, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", F, [1, 2, 16, 16])], [w, s, o])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_numpy_warnings_say_where_they_arose(tmp_path, capsys) -> None:
    path = write_model(tmp_path, _sigmoid_model(-1000.0))
    code, out, err = run_cli(capsys, "verify", path, path, "--reference")
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings and all("numpy in onnx.reference's ops/op_sigmoid.py (verify --reference runs it): " in w
                            for w in warnings), err
    assert len(warnings) == len(set(warnings))  # each once


def test_inconclusive_verdict_line_does_not_stutter(tmp_path, capsys) -> None:
    ref = write_model(tmp_path, _sigmoid_model(-1000.0), "ref.onnx")  # sigmoid(-1000·x) is 0 on image-like inputs
    cand = _sigmoid_model(-1000.0, 1e-6)  # within tolerance, not identical: the reference says nothing
    cand_path = write_model(tmp_path, cand, "cand.onnx")
    code, out, err = run_cli(capsys, "verify", ref, cand_path)
    verdict = " ".join(out[out.index("INCONCLUSIVE: "):].split())
    assert code == 1 and verdict.startswith("INCONCLUSIVE: the reference's output y") and "inconclusive:" not in verdict


def _report(a_ms: float, b_ms: float, ratio: float) -> BenchReport:
    timing: dict[str, Any] = dict(session_s=0.1, warmup=1, runs=20, batch=1, q1_ms=0, q3_ms=0, iqr_ms=0, min_ms=0, mean_ms=0,
                  throughput_per_s=1)
    models = [ModelTiming(name="original", source="a", median_ms=a_ms, **timing),
              ModelTiming(name="rewritten", source="b", median_ms=b_ms, **timing)]
    return BenchReport(models=models, ratios=[PairRatio("rewritten", "original", 20, ratio, ratio, ratio, ratio, ratio)],
                       provider="cpu", threads=None, opt_level="all", io_binding=False, spinning=False, inputs="",
                       environment={})


def test_a_speed_up_that_the_medians_do_not_show_is_explained() -> None:
    text = _report(145.067, 143.204, 1.09).summary()  # the figures: 1.013× by the medians
    assert "rewritten 1.09× the speed of original (median of 20 pairs; 1.01× by the medians above" in text
    assert "by the medians" not in _report(145.067, 133.0, 1.09).summary()  # 1.0907×: they agree


def test_text_uses_a_wide_pipes_width(models_dir, tmp_path) -> None:
    """A table title longer than its table was wrapped at the table's width (~77 columns) in a 160-column pipe."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "convgraph", "rewrite", str(models_dir / "sample.onnx"), "--rule",
                        "separable", "--no-bench", "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("model outputs vs original: fail at the default tolerance (not required: give --atol")
               and ln.rstrip().endswith("--min-cosine)") for ln in r.stdout.splitlines()), r.stdout
