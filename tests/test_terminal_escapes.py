"""Names from a model never reach the terminal as control sequences: tables, markdown, warnings, errors and
progress show them escaped (a conv named "\\x1b]0;TITLE\\x07..." once set the terminal's title)."""

from __future__ import annotations

import json
import re

import onnx
import pytest

from convgraph.cli import main
from convgraph.cli.common import printable
from convgraph.cli.progress import Lines

EVIL = "\x1b]0;TITLE\x07\x1b[2J\x1b]52;c;aGk=\x07\u202eevil\x9b31m\nline"
#: What a terminal acts on: C0/C1 controls but the line breaks between lines of output, bidi overrides.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture()
def evil_model(models_dir, tmp_path):
    m = onnx.load(models_dir / "sample.onnx")
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.name = EVIL + conv.name
    x = m.graph.input[0].name
    for n in m.graph.node:  # the input renamed too: warnings and errors name it
        n.input[:] = [EVIL if t == x else t for t in n.input]
    m.graph.input[0].name = EVIL
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a dynamic dim: a warning names the input
    path = tmp_path / "evil.onnx"
    onnx.save(m, path)
    return path


def test_printable_escapes_what_a_terminal_acts_on() -> None:
    assert printable(EVIL) == "\\x1b]0;TITLE\\x07\\x1b[2J\\x1b]52;c;aGk=\\x07\\u202eevil\\x9b31m\\nline"
    assert printable("a\nb", newlines=True) == "a\nb" and printable("/model.22/cv2·×→ é") == "/model.22/cv2·×→ é"


@pytest.mark.parametrize("argv", [
    ["analyze", "{m}"], ["analyze", "{m}", "--format", "markdown"], ["analyze", "{m}", "--input-shape", "nope=1"],
    ["rewrite", "{m}", "--rule", "separable", "--explain", "--dry-run"],
    ["rewrite", "{m}", "--rule", "separable", "--param", "rank=full", "--no-bench", "--input-shape", "{x}=1,3,64,64",
     "-o", "{tmp}/o.onnx"],
    ["verify", "{m}", "{tmp}/approx.onnx", "--input-shape", "{x}=1,3,64,64", "--localize"],
    ["bench", "{m}", "{tmp}/approx.onnx", "--input-shape", "{x}=1,3,64,64", "--runs", "2", "--warmup", "1"],
])
def test_no_control_sequence_reaches_the_output(evil_model, tmp_path, capsys, argv) -> None:
    argv = [a.format(m=evil_model, x=EVIL, tmp=tmp_path) for a in argv]
    if "approx.onnx" in " ".join(argv):  # the evil conv approximated: verify --localize names it
        assert main(["rewrite", str(evil_model), "--rule", "separable", "--nodes", "TITLE", "--no-verify",
                     "--no-bench", "--input-shape", f"{EVIL}=1,3,64,64", "-o", str(tmp_path / "approx.onnx")]) == 0
        capsys.readouterr()
    main(argv)
    cap = capsys.readouterr()
    assert cap.out or cap.err
    assert not RAW.search(cap.out) and not RAW.search(cap.err), (cap.out, cap.err)
    if argv[0] != "bench":  # bench names no node
        assert "\\x1b]0;TITLE" in cap.out + cap.err  # shown, escaped


def test_json_escapes_them_too(evil_model, capsys) -> None:
    main(["analyze", str(evil_model), "--json"])
    out = capsys.readouterr().out
    assert not RAW.search(out) and json.loads(out)["convs"][0]["name"].startswith(EVIL)


def test_progress_lines_escape_stage_names(capsys) -> None:
    lines = Lines(delay=0)
    lines.start(f"localizing {EVIL}")
    lines.finish()
    lines.close()
    err = capsys.readouterr().err
    assert "\\x1b]0;TITLE" in err and not RAW.search(err)
