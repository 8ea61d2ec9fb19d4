"""``convgraph analyze``: table, JSON, markdown, DOT, sorting, warnings and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convgraph.cli import main
from convgraph.model.record import KINDS


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_is_one_object_with_the_issue_layout(capsys, models_dir):
    code, out, err = _run(capsys, str(models_dir / "sample.onnx"), "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert list(doc) == ["model", "inputs", "symbols", "convs", "totals", "roofline"]  # "profile" too with --profile
    assert doc["model"]["path"].endswith("sample.onnx")
    assert [c["name"] for c in doc["convs"]][:2] == ["stem/conv", "block1/conv"]
    assert doc["totals"]["convs"] == 8 and doc["totals"]["macs"] == sum(c["macs"] for c in doc["convs"])
    up = next(c for c in doc["convs"] if c["kind"] == "transposed")
    assert up["checkerboard"] is True and up["output_shape"] == [1, 16, 32, 32]


def test_json_sort_and_top(capsys, models_dir):
    code, out, _ = _run(capsys, str(models_dir / "sample.onnx"), "--format", "json", "--sort", "macs", "--top", "3")
    doc = json.loads(out)
    macs = [c["macs"] for c in doc["convs"]]
    assert code == 0 and len(macs) == 3 and macs == sorted(macs, reverse=True)
    assert doc["convs"][0]["name"] == "block3/dilated" and doc["totals"]["convs"] == 8  # totals stay whole


def test_table_default(capsys, models_dir):
    code, out, _ = _run(capsys, str(models_dir / "sample.onnx"))
    assert code == 0
    for text in ("stem/conv", "block2/dw", "depthwise", "transposed", "totals by kind", "19×19", "checkerboard"):
        assert text in out
    assert "%" in out


def test_markdown(capsys, models_dir):
    code, out, _ = _run(capsys, str(models_dir / "depthwise.onnx"), "--format", "markdown", "--sort", "name")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| name | kind |")
    rows = [ln for ln in lines[:lines.index("")] if ln.startswith("| dw")]  # the first table (memory/time follows)
    assert [r.split(" | ")[0] for r in rows] == ["| dw3x3", "| dw3x3_mult2"]
    assert "| all | 2 |" in out


def test_dot(capsys, models_dir, tmp_path):
    dot = tmp_path / "g.dot"
    code, out, err = _run(capsys, str(models_dir / "subgraph.onnx"), "--json", "--dot", str(dot))
    assert code == 0 and json.loads(out)["totals"]["convs"] == 3 and str(dot) in err
    text = dot.read_text()
    assert text.startswith("digraph convgraph {") and text.rstrip().endswith("}")
    assert "subgraph cluster_" in text and "then/conv" in text
    assert text.count("fillcolor=\"#") >= 3  # the three convs, coloured by kind
    assert text.count("{") == text.count("}")


def test_dynamic_warns_once_and_input_shape_fixes(capsys, models_dir):
    code, out, err = _run(capsys, str(models_dir / "dynamic.onnx"), "--json")
    doc = json.loads(out)
    assert code == 0 and err.count("warning:") == 1 and "--input-shape" in err
    assert all(c["macs"] is None and c["params"] > 0 for c in doc["convs"])
    code, out, err = _run(capsys, str(models_dir / "dynamic.onnx"), "--json", "--input-shape", "x=1,3,32,32")
    doc = json.loads(out)
    assert code == 0 and "warning" not in err and all(c["macs"] for c in doc["convs"])
    assert doc["inputs"][0]["shape"] == [1, 3, 32, 32] and doc["inputs"][0]["fixed"] is True


@pytest.mark.parametrize("argv, message", [
    (["--json", "--format", "table"], "conflicts"),
    (["--input-shape", "y=1,2"], "not an input"),
    (["--dot", "/nonexistent/dir/g.dot"], "does not exist"),
])
def test_usage_errors(capsys, models_dir, argv, message):
    code, out, err = _run(capsys, str(models_dir / "standard.onnx"), *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert out == "" if "--json" not in argv else json.loads(out) == {"error": err.strip().removeprefix(
        "convgraph: error: "), "exit_code": 2}  # --json: one document, the error too
    assert len(err.strip().splitlines()) == 1


def test_bad_model_file(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, out, err = _run(capsys, str(bad))
    assert code == 2 and out == "" and "bad.onnx" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, str(tmp_path / "missing.onnx"))
    assert code == 2 and "no such file" in err


def test_kind_colours_cover_all_kinds():
    from convgraph.analysis.report import KIND_COLORS

    assert set(KIND_COLORS) == set(KINDS)


@pytest.mark.real
def test_warning_with_bracketed_dims_is_printed_verbatim(capsys, real_models):
    """PP-OCR det's input dims are named p2o.DynamicDimension.N: rich must not eat '[...]' as markup."""
    code, _, err = _run(capsys, str(real_models("ppocr-det")), "--top", "1")
    assert code == 0 and "[p2o.DynamicDimension.0,3," in err.replace("\n", "")


def test_json_run_imports_only_what_analyze_needs(models_dir):
    """``convgraph analyze --json`` loads neither rich nor the other commands' modules (start-up time)."""
    code = ("import sys; from convgraph.cli import main; "
            f"rc = main(['analyze', '--json', {str(models_dir / 'sample.onnx')!r}]); "
            "loaded = [m for m in ('rich', 'convgraph.cli.rewrite', 'convgraph.cli.verify', 'convgraph.cli.optimize', "
            "'convgraph.cli.bench', 'convgraph.engine.rewrite') if m in sys.modules]; "
            "print('LOADED', rc, ','.join(loaded), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["convs"] == 8
    assert r.stderr.splitlines()[-1] == "LOADED 0 "  # nothing listed


def test_every_command_is_listed_and_runs_on_demand(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in ("analyze", "bench", "optimize", "rewrite", "rules", "verify"))
    assert main(["rules", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= {"dense", "fold-bn", "separable"}
