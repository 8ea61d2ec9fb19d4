"""Tables at 80 columns: every line fits, no number is cut, long names are shortened in the middle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rich.cells import cell_len

from convgraph.cli.tables import Column, layout, shorten, shorten_all
from convgraph.analysis.report import human

YOLO = ("yolov8n", "images=1,3,320,320")
DET = ("ppocr-det", "x=1,3,640,640")


def _cli(*argv: str, columns: int | str | None = 80) -> subprocess.CompletedProcess:
    """The CLI in a pipe, as a log or `| less` would see it; COLUMNS as given."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "convgraph", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)


def _fits(text: str, width: int = 80) -> None:
    too_wide = [ln for ln in text.splitlines() if cell_len(ln.rstrip()) > width]
    assert not too_wide, too_wide[:3]


def _tokens(text: str) -> set[str]:
    return set(text.split())


def _shown(name: str, text: str) -> bool:
    """``name`` is in the table whole, or shortened in the middle (its head and tail around '…')."""
    if name in text:
        return True
    for token in text.split():
        if "…" in token:
            head, tail = token.split("…", 1)
            if name.startswith(head) and name.endswith(tail) and len(head) + len(tail) >= 8:
                return True
    return False


def test_shorten_cuts_the_middle():
    name = "/model.22/cv3.2/cv3.2.0/conv/Conv"
    assert shorten(name, 20) == "/model.22…/conv/Conv"
    assert shorten(name, len(name)) == name
    assert all(len(shorten(name, w)) == w for w in range(1, len(name)))


#: YOLOv8n's head: 12 convs that `shorten` showed under 2 names at 80 columns.
HEAD = [f"/model.22/cv{b}.{s}/cv{b}.{s}.{k}/conv/Conv" for s in range(3) for b in (2, 3) for k in (0, 1)]


@pytest.mark.parametrize("width", [20, 24, 26, 30])
def test_shortened_names_stay_distinct(width):
    names = HEAD + [f"/model.22/cv{b}.{s}/cv{b}.{s}.2/Conv" for s in range(3) for b in (2, 3)] + ["/model.0/conv/Conv"]
    short = shorten_all(names, width)
    assert width > 26 or len({shorten(n, width) for n in HEAD}) < len(HEAD)  # what the plain cut did
    assert len(set(short)) == len(names) and all(len(t) <= width for t in short)
    for n, t in zip(names, short):  # each is a cut of its own name: head … tail
        head, _, tail = t.partition("…")
        assert n == t or (n.startswith(head) and n.endswith(tail))
    assert shorten_all(names, 60) == names and shorten_all(["/a/x", "/b/x"], 2) == ["…x", "…x"]  # too narrow: left as cut


def test_layout_drops_by_rank_and_never_narrows_a_number():
    columns = [Column("name", "name"), Column("MACs before → after", "num"), Column("note", drop=2),
               Column("empty", "num", drop=9), Column("extra", "num", drop=1)]
    rows = [("/model.22/cv3.2/cv3.2.0/conv/Conv", "530,841,600 → 81,100,800", "a long remark about it", "?",
             "123456789")] * 3
    shown, widths, light = layout(columns, rows, 40)
    assert light and shown == [0, 1]  # "empty" says nothing: it goes first, then by rank
    assert widths[1] >= len("530,841,600") and sum(widths.values()) + 2 <= 40
    shown, widths, light = layout(columns, rows, None)  # --wide: everything, at natural width
    assert shown == [0, 1, 2, 3, 4] and not light and widths[0] == len(rows[0][0])


@pytest.mark.real
@pytest.mark.parametrize("model", [YOLO, DET], ids=["yolov8n", "ppocr-det"])
def test_analyze_at_80_columns(real_models, model):
    path = real_models(model[0])
    doc = json.loads(_cli("analyze", path, "--input-shape", model[1], "--json").stdout)
    r = _cli("analyze", path, "--input-shape", model[1])
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    tokens = _tokens(r.stdout)
    for c in doc["convs"]:
        assert human(c["macs"]) in tokens and human(c["params"]) in tokens
        assert _shown(c["name"], r.stdout), c["name"]
    table = r.stdout.split("memory and time per conv")[0].split("best rewrite", 1)[1]
    names = [ln.split()[0] for ln in table.splitlines()[2:] if ln.strip() and not ln.startswith(" ")]
    names = names[:len(doc["convs"])]
    assert len(names) == len(doc["convs"]) and len(set(names)) == len(names)  # shortened names stay distinct
    assert "hidden to fit 80 columns" in r.stdout and "--wide" in r.stdout
    wide = _cli("analyze", path, "--input-shape", model[1], "--wide")
    assert "hidden" not in wide.stdout and all(c["name"] in wide.stdout for c in doc["convs"])
    assert "receptive field" in wide.stdout


def test_analyze_with_dynamic_sizes_fits_80_columns(real_models):
    """YOLOv8n as shipped (batch, height and width dynamic): MACs are formulas, and the totals by kind, which once
    ran to 102 columns, give up their MACs + bias column instead."""
    r = _cli("analyze", real_models("yolov8n"))
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    totals = r.stdout.split("totals by kind")[1]
    assert "⌈height/32⌉" in totals and "hidden to fit 80 columns: MACs + bias" in totals


@pytest.mark.real
def test_rewrite_tables_at_80_columns(real_models, tmp_path):
    yolo, det = real_models("yolov8n"), real_models("ppocr-det")
    dry = ("rewrite", yolo, "--input-shape", YOLO[1], "--rule", "separable", "--dry-run")
    doc = json.loads(_cli(*dry, "--json").stdout)
    r = _cli(*dry)
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    tokens = _tokens(r.stdout)
    for c in doc["changes"]:
        assert f"{c['macs_before']:,}" in tokens and f"{c['macs_after']:,}" in tokens
        assert _shown(c["node"], r.stdout)
    explain = _cli("rewrite", det, "--input-shape", DET[1], "--rule", "separable", "--dry-run", "--explain")
    _fits(explain.stdout)
    assert "p2o.Conv.61" in explain.stdout and "already depthwise" in explain.stdout

    out = tmp_path / "y.onnx"
    r = _cli("rewrite", yolo, "--input-shape", YOLO[1], "--rule", "fold-bn", "--rule", "separable", "--no-bench",
             "-o", out)
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    for c in json.loads(_cli("rewrite", yolo, "--input-shape", YOLO[1], "--rule", "separable", "--no-verify",
                             "--no-bench", "--json", "-o", tmp_path / "z.onnx").stdout)["changes"]:
        assert f"{c['macs_before']:,}" in _tokens(r.stdout)

    verify = ("verify", yolo, out, "--input-shape", YOLO[1])
    doc = json.loads(_cli(*verify, "--json").stdout)
    r = _cli(*verify)
    assert r.returncode == 1, r.stderr  # separable is approximate: outside the default tolerance
    _fits(r.stdout)
    m = doc["outputs"]["output0"]
    assert f"{m['cosine']:.6f}" in _tokens(r.stdout)
    # the DFL's distances, judged beside output0 (what it adds the anchor grid to), take the name column's room
    assert doc["judged_beside"] == ["/model.22/Sigmoid_output_0", "/model.22/dfl/conv/Conv_output_0"]
    assert _shown("/model.22/dfl/conv/Conv_output_0", r.stdout)
    assert "1x22x2100" in _cli(*verify, "--wide").stdout

    r = _cli("bench", yolo, out, "--input-shape", YOLO[1], "--runs", "3", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    assert "baseline" in r.stdout and "×" in r.stdout


def test_rules_at_80_columns():
    r = _cli("rules")
    assert r.returncode == 0
    _fits(r.stdout)
    for rule in json.loads(_cli("rules", "--json").stdout):
        assert rule["name"] in _tokens(r.stdout)


def test_pipes_stay_wide_unless_columns_is_set(models_dir):
    r = _cli("analyze", models_dir / "sample.onnx", columns=None)
    assert "19×19" in r.stdout and "hidden" not in r.stdout  # the receptive fields are there
    assert max(cell_len(ln) for ln in r.stdout.splitlines()) > 80
    r = _cli("analyze", models_dir / "sample.onnx", columns=60)
    _fits(r.stdout, 60)
    assert "hidden to fit 60 columns" in r.stdout


def test_a_columns_value_that_is_no_width_is_ignored():
    r = _cli("rules", columns="wide")
    assert r.returncode == 0 and r.stderr == "" and "transpose-subpixel" in r.stdout


def test_symbolic_shapes_at_80_columns(real_models):
    """PP-OCR det with its dims left dynamic: the totals table was 360 columns wide ("pointwis" / "e"), --sort macs
    kept model order, the best-rewrite column was empty. Now everything fits, and shares and the ranking are
    those of the reference size, which a line states."""
    path = real_models("ppocr-det")
    r = _cli("analyze", path, "--sort", "macs", "--top", "8")
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    assert "pointwise" in r.stdout.split("totals by kind")[1] and "pointwis\n" not in r.stdout
    note = " ".join(r.stdout.split("% MACs and the ranking by MACs at the reference size")[1].split()[:3])
    assert note.startswith("N=1, H=W=640"), note
    fixed = json.loads(_cli("analyze", path, "--input-shape", DET[1], "--sort", "macs", "--top", "8", "--json").stdout)
    table = r.stdout.split("memory and time per conv")[0]
    shown = [ln.split()[0] for ln in table.splitlines() if ln.startswith("p2o.")]
    assert shown == [c["name"] for c in fixed["convs"]]  # ranked as the concrete MACs at 640×640 rank them
    assert "separable −85% ≈" in table  # the best rewrite, at the reference size
    for c in fixed["convs"][:3]:  # the shares are those at 640×640
        assert f"{100 * c['macs'] / fixed['totals']['macs']:.1f}%" in table


def test_symbolic_markdown_keeps_every_digit(real_models):
    r = _cli("analyze", real_models("ppocr-det"), "--format", "markdown")
    assert r.returncode == 0 and "3,089,664·N·⌈H/32⌉·⌈W/32⌉" in r.stdout and "3.1M" not in r.stdout


def test_a_line_column_is_hidden_rather_than_folded():
    """optimize's fit notes ("rank 1 of 9, layout multiplier; output error 0.23") folded into five lines a row at
    80 columns: as a "line" column it is hidden first (and shown whole when there is room)."""
    columns = [Column("node", "name"), Column("rule"), Column("saving", "num"), Column("fit", "line", drop=1)]
    rows = [("/model.22/cv2.1/cv2.1.0/conv/Conv", "separable", "0.290",
             "rank 1 of 9, layout multiplier; output error 0.23")] * 3
    shown, widths, _ = layout(columns, rows, 80)
    assert shown == [0, 1, 2] and widths[0] == len(rows[0][0])
    shown, widths, _ = layout(columns, rows, 120)
    assert shown == [0, 1, 2, 3] and widths[3] == len(rows[0][3])
