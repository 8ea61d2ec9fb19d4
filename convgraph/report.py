"""Rendering an :class:`~convgraph.analyze.Analysis`: table rows (the CLI draws them), markdown, Graphviz DOT."""

from __future__ import annotations

from typing import Iterable

from .analyze import Analysis, best_saving, conv_op
from .errors import UsageError
from .record import KINDS, ConvRecord

SORT_KEYS = ("macs", "params", "name")

#: Fill colour of each conv kind in the DOT output.
KIND_COLORS = {
    "standard": "#e41a1c", "pointwise": "#377eb8", "depthwise": "#4daf4a", "grouped": "#984ea3",
    "pointwise_grouped": "#ff7f00", "transposed": "#a65628",
}


def human(n: "int | float | None") -> str:
    """1234567 → '1.23M'; None → '?'."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def select(records: list[ConvRecord], sort: str | None = None, top: int | None = None) -> list[ConvRecord]:
    """Records in model order, or sorted (MACs/params descending, unknown last; name ascending); the first ``top``."""
    if sort is not None and sort not in SORT_KEYS:
        raise UsageError(f"unknown sort key {sort!r}; use one of {', '.join(SORT_KEYS)}")
    rs = list(records)
    if sort == "name":
        rs.sort(key=lambda r: (r.graph, r.name or r.node_id))
    elif sort in ("macs", "params"):
        rs.sort(key=lambda r: (getattr(r, sort) is None, -(getattr(r, sort) or 0)))
    return rs[:top] if top is not None else rs


def _dims(values: Iterable) -> str:
    return "×".join("?" if v is None else str(v) for v in values)


def _geometry(r: ConvRecord) -> str:
    parts = [_dims(r.kernel)]
    if any(s != 1 for s in r.strides):
        parts.append(f"s{_dims(r.strides)}")
    if r.dilated:
        parts.append(f"d{_dims(r.dilations)}")
    if r.group != 1:
        parts.append(f"g{r.group}")
    return " ".join(parts)


def _kind(r: ConvRecord) -> str:
    text = r.kind + (f" ×{r.depth_multiplier}" if r.depth_multiplier not in (None, 1) else "")
    if r.quantized:
        text += " q"
    if r.fast_depthwise is False:
        text += " (slow)"
    if r.checkerboard:
        text += " (checkerboard)"
    return text


def _share(r: ConvRecord, total: int | None) -> str:
    return f"{100 * r.macs / total:.1f}%" if r.macs is not None and total else "?"


def _saving(r: ConvRecord) -> str:
    opt, share = best_saving(r)
    if opt is None:
        return ""
    change = -100 * share
    sign = "−" if round(change) < 0 else "+" if round(change) > 0 else "±"
    return f"{opt.rule} {sign}{abs(change):.0f}%{'' if opt.exact else ' ≈'}"


def row(r: ConvRecord, total_macs: int | None) -> list[str]:
    """One conv as the table's cells."""
    name = r.name or r.node_id
    if r.graph:
        name = f"{r.graph}/{name}"
    rf = _dims(r.receptive_field) if r.receptive_field else "?"
    shape = _dims(r.output_shape) if r.output_shape is not None else "?"
    if r.shape_source == "measured":
        shape += " (measured)"  # from a run of the model (--probe), not from shape inference
    return [name, _kind(r), _geometry(r), f"{r.in_channels}→{r.out_channels}", shape, human(r.macs),
            _share(r, total_macs), human(r.params), rf, _saving(r)]


COLUMNS = ("name", "kind", "kernel stride dil group", "in→out", "output", "MACs", "% MACs", "params",
           "receptive field", "best rewrite")


KIND_COLUMNS = ("kind", "convs", "MACs", "% MACs", "MACs + bias", "params")
#: Right-aligned columns of both tables.
NUMERIC = frozenset({"convs", "MACs", "% MACs", "MACs + bias", "params"})


def kind_rows(a: Analysis) -> list[list[str]]:
    """The totals per conv kind present, then "all" (the model's totals), as cells under KIND_COLUMNS."""
    total = a.totals["macs"]
    pairs = [(kind, a.totals["by_kind"][kind]) for kind in KINDS if kind in a.totals["by_kind"]] + [("all", a.totals)]
    return [[kind, str(v["convs"]), human(v["macs"]),
             f"{100 * v['macs'] / total:.1f}%" if v["macs"] is not None and total else "?",
             human(v["macs_bias"]), human(v["params"])] for kind, v in pairs]


def _markdown_table(columns: Iterable[str], rows: Iterable[list[str]]) -> list[str]:
    columns = list(columns)
    return (["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|"]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def markdown(a: Analysis, sort: str | None = None, top: int | None = None) -> str:
    """The same two tables as GitHub markdown."""
    convs = [row(r, a.totals["macs"]) for r in select(a.convs, sort, top)]
    return "\n".join(_markdown_table(COLUMNS, convs) + [""] + _markdown_table(KIND_COLUMNS, kind_rows(a))) + "\n"


# ---- Graphviz DOT ---------------------------------------------------------------------------------
def _q(*lines: str) -> str:
    """A quoted DOT string; several lines are joined by DOT's line break."""
    esc = [s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") for s in lines]
    return '"' + "\\n".join(esc) + '"'


def dot(a: Analysis) -> str:
    """Graphviz DOT of the model's ops (subgraphs as clusters), convs filled by kind; initializers left out."""
    records = {(r.graph, r.node_id): r for r in a.convs}
    lines = ["digraph convgraph {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fillcolor="#eeeeee", '
             'fontname="Helvetica", fontsize=10];', '  edge [color="#777777", arrowsize=0.6];']
    for kind, color in KIND_COLORS.items():
        lines.append(f"  // {kind}: {color}")
    for n, (path, g) in enumerate(a.graphs.items()):
        indent = "  "
        if path:
            lines.append(f"  subgraph cluster_{n} {{")
            lines.append(f"    label={_q(path)}; style=dashed;")
            indent = "    "
        for nid, d in g.graph.nodes(data=True):
            kind = d["kind"]
            if kind in ("initializer", "sparse_initializer", "outer") or d.get("op_type") == "Constant":
                continue  # weights, not the data flow
            key = _q(f"{path}|{nid}")
            if kind == "op":
                r = records.get((path, nid))
                if r is not None:
                    label = _q(r.name or nid, f"{r.kind} {_geometry(r)}",
                               f"{r.in_channels}→{r.out_channels}  {human(r.macs)} MACs")
                    fill = KIND_COLORS[r.kind]
                    lines.append(f'{indent}{key} [label={label}, fillcolor="{fill}", fontcolor="white"];')
                else:
                    style = ', fillcolor="#cccccc"' if conv_op(d) is not None else ""
                    lines.append(f"{indent}{key} [label={_q(d['op_type'])}{style}];")
            else:
                name = d["proto"].name
                shape = g.shape(name)
                label = _q(name, _dims(shape)) if shape is not None else _q(name)
                lines.append(f'{indent}{key} [label={label}, shape=ellipse, fillcolor="white"];')
        for u, v, data in g.graph.edges(data=True):
            du = g.graph.nodes[u]
            if du["kind"] in ("initializer", "sparse_initializer", "outer") or du.get("op_type") == "Constant":
                continue
            style = ", style=dashed" if data.get("implicit") else ""
            lines.append(f"{indent}{_q(f'{path}|{u}')} -> {_q(f'{path}|{v}')} [tooltip={_q(data['tensor'])}{style}];")
        if path:
            lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
