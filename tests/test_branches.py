"""Rewrites inside If branches reach the model-level check: a branch no input took runs with its condition
forced (convgraph.engine.branches); one that cannot run is named, and an exact rewrite there that nothing
checked fails the rewrite."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convgraph.cli import main
from convgraph.errors import CheckFailed
from convgraph.engine.rewrite import rewrite
from convgraph.registry import all_rules
from helpers import resized_if

F = TensorProto.FLOAT


def _model(stride_in_branch: int = 1) -> onnx.ModelProto:
    """x [1,3,8,8] → Resize by Sqrt([1,1,4,4]) (a shape the static engine cannot follow: the branch's conv
    cannot be checked alone) → conv "main"; If sr > 8000 (generated sr: 0-9, the else branch): then a 3×3
    conv "inner" on it (stride ``stride_in_branch``), else Identity; y = that + "main"'s output."""
    return resized_if([helper.make_node("Conv", ["m", "w2"], ["ya"], name="inner", pads=[1, 1, 1, 1],
                                         strides=[stride_in_branch] * 2)], inner_kernel=3, add_main=True)


def _inner(report):
    return next(c for c in report.changes if c.node == "inner")


def test_a_branch_no_input_took_runs_forced():
    res = rewrite(_model(), ["separable"], params={"rank": "full"}, input_shapes={"sr": []})
    c = _inner(res.report)
    assert c.output_error is None and c.checked_on.startswith("not checked alone: input shapes unknown")
    assert c.checked_on.endswith("; model outputs with the branch forced")
    assert res.report.passed and any("no input took the then branch of the If making 'b'" in w
                                     for w in res.report.warnings)


def test_a_broken_exact_rewrite_in_such_a_branch_is_refused():
    """Before: written, 'not checked alone: input shapes unknown', the model-level check on the other branch."""
    rule = all_rules()["separable"]
    real_build = rule.build

    def broken(rec, ctx, params):
        rep = real_build(rec, ctx, params)
        if rec.name == "inner":
            t = rep.initializers[0]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
        return rep

    object.__setattr__(rule, "build", broken)
    try:
        with pytest.raises(CheckFailed, match="then branch of the If making 'b'"):
            rewrite(_model(), ["separable"], params={"rank": "full"}, input_shapes={"sr": []})
    finally:
        object.__setattr__(rule, "build", real_build)


def test_a_branch_that_cannot_run_is_named_and_its_unchecked_exact_rewrite_fails(tmp_path, capsys):
    """Forced, the then branch (stride 2) cannot be added to the main conv's output: the branch is named; its
    exact rewrite, checked by nothing, fails the rewrite (exit 1, not written) unless --keep-failed."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(stride_in_branch=2).SerializeToString())
    out = tmp_path / "o.onnx"
    argv = ["rewrite", str(path), "--rule", "separable", "--param", "rank=full", "--no-bench", "--input-shape", "sr=",
            "-o", str(out), "--json"]
    assert main(argv) == 1
    doc = json.loads(capsys.readouterr().out)
    (failure,) = doc["failures"]
    assert "inner (separable) in /if:then_branch were checked neither alone (input shapes unknown)" in failure
    assert "which no input took; forcing its condition, the model fails to run" in failure and not out.exists()
    assert main([*argv, "--keep-failed"]) == 1 and out.exists()
