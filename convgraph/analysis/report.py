"""Rendering an :class:`~convgraph.analysis.analyze.Analysis`: table rows (the CLI draws them), markdown, Graphviz DOT."""

from __future__ import annotations

from typing import Iterable

from .analyze import Analysis, best_saving
from ..model.convops import conv_op
from ..errors import UsageError
from ..model.expr import parse
from ..model.record import KINDS, ConvRecord
from ..model.reference import describe, reference_values, value

SORT_KEYS = ("macs", "params", "name", "time")
#: Record attribute each numeric sort key orders by (largest first).
_SORT_FIELDS = {"macs": "macs", "params": "params", "time": "time_ms"}

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


def cost(n: "int | None", expr=None, exact: bool = False) -> str:
    """MACs for a table: ``human(n)``, or the formula over the symbols (an Expr or its text) in short form
    (``7.9k·H·W``, terms spaced so that a cell may wrap between them); ``exact``: every digit (markdown)."""
    if n is None and expr is not None:
        e = parse(expr) if isinstance(expr, str) else expr
        return e.compact(exact=exact, spaced=True) if hasattr(e, "compact") else cost(e, exact=exact)
    return f"{n:,}" if exact and n is not None else human(n)


def reference(a: Analysis) -> "dict[str, int] | None":
    """Where the model's MACs are a formula: the symbols' values at the reference size (:mod:`convgraph.model.reference`)
    at which shares are given and convs ranked by MACs; else None."""
    return reference_values(a.symbols) if a.totals.get("macs") is None and a.symbols else None


def reference_note(a: Analysis, sort: str | None = None) -> str | None:
    """The line saying at which size the shares (and a ranking by MACs) of a model with formulas are taken."""
    values = reference(a)
    if values is None:
        return None
    ranked = " and the ranking by MACs" if sort == "macs" else ""
    return (f"% MACs{ranked} at the reference size {describe(values)} (dims left dynamic; --input-shape fixes them)")


def macs_at(macs, expr, values: "dict[str, int] | None"):
    """``macs``, or where it is None the formula ``expr`` (an Expr or its text) at ``values``; None if neither."""
    if macs is not None or expr is None or values is None:
        return macs
    return value(parse(expr) if isinstance(expr, str) else expr, values)


def select(records: list[ConvRecord], sort: str | None = None, top: int | None = None,
           values: "dict[str, int] | None" = None) -> list[ConvRecord]:
    """Records in model order, or sorted (MACs/params/time descending, unknown last; name ascending); the first
    ``top``. MACs that are formulas rank at ``values`` (the reference size, :func:`reference`)."""
    if sort is not None and sort not in SORT_KEYS:
        raise UsageError(f"unknown sort key {sort!r}; use one of {', '.join(SORT_KEYS)}")
    rs = list(records)
    if sort == "name":
        rs.sort(key=lambda r: (r.graph, r.name or r.node_id))
    elif sort == "macs":
        at = {id(r): macs_at(r.macs, r.macs_expr, values) for r in rs}
        rs.sort(key=lambda r: (at[id(r)] is None, -(at[id(r)] or 0)))
    elif sort in _SORT_FIELDS:
        attr = _SORT_FIELDS[sort]
        rs.sort(key=lambda r: (getattr(r, attr) is None, -(getattr(r, attr) or 0)))
    return rs[:top] if top is not None else rs


def _dims(values: Iterable) -> str:
    return "×".join("?" if v is None else v.compact() if hasattr(v, "compact") else str(v) for v in values)


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


def _share(r: ConvRecord, total, values: "dict[str, int] | None" = None) -> str:
    """Its share of ``total`` MACs (at the reference size ``values`` where they are formulas)."""
    macs = macs_at(r.macs, r.macs_expr, values)
    return f"{100 * macs / total:.1f}%" if macs is not None and total else "?"


def _saving(r: ConvRecord) -> str:
    opt, share = best_saving(r)
    if opt is None or share is None:
        return ""
    change = -100 * share
    sign = "−" if round(change) < 0 else "+" if round(change) > 0 else "±"
    text = f"{opt.rule} {sign}{abs(change):.0f}%{'' if opt.exact else ' ≈'}"
    if opt.time_saved_ms is not None:  # profiled: the estimate in time (measured time × MAC saving)
        text += f" (est. {'−' if opt.time_saved_ms >= 0 else '+'}{abs(opt.time_saved_ms):.2f} ms)"
    return text


def row(r: ConvRecord, total_macs, values: "dict[str, int] | None" = None, exact: bool = False) -> list[str]:
    """One conv as the table's cells (``total_macs`` and shares at ``values`` where MACs are formulas;
    ``exact``: MACs in every digit)."""
    name = r.name or r.node_id
    if r.graph:
        name = f"{r.graph}/{name}"
    rf = _dims(r.receptive_field) if r.receptive_field else "?"
    shape = _dims(r.output_shape) if r.output_shape is not None else "?"
    if r.shape_source == "measured":
        shape += " (measured)"  # from a run of the model (--probe), not from shape inference
    return [name, _kind(r), _geometry(r), f"{r.in_channels}→{r.out_channels}", shape,
            cost(r.macs, r.macs_expr, exact), _share(r, total_macs, values), human(r.params), rf, _saving(r)]


COLUMNS = ("name", "kind", "kernel stride dil group", "in→out", "output", "MACs", "% MACs", "params",
           "receptive field", "best rewrite")


KIND_COLUMNS = ("kind", "convs", "MACs", "% MACs", "MACs + bias", "params")
#: Right-aligned columns of both tables.
NUMERIC = frozenset({"convs", "MACs", "% MACs", "MACs + bias", "params", "weights", "activations", "MAC/B",
                     "time ms", "% time", "reorder ms", "GMAC/s", "× roofline"})


def total_macs(a: Analysis):
    """The model's MACs, at the reference size where they are a formula (:func:`reference`)."""
    return macs_at(a.totals["macs"], a.totals.get("macs_expr"), reference(a))


def kind_rows(a: Analysis, exact: bool = False) -> list[list[str]]:
    """The totals per conv kind present, then "all" (the model's totals), as cells under KIND_COLUMNS (shares at
    the reference size where MACs are formulas)."""
    values, total = reference(a), total_macs(a)
    pairs = [(kind, a.totals["by_kind"][kind]) for kind in KINDS if kind in a.totals["by_kind"]] + [("all", a.totals)]
    rows = []
    for kind, v in pairs:
        macs = macs_at(v["macs"], v.get("macs_expr"), values)
        rows.append([kind, str(v["convs"]), cost(v["macs"], v.get("macs_expr"), exact),
                     f"{100 * macs / total:.1f}%" if macs is not None and total else "?",
                     cost(v["macs_bias"], v.get("macs_bias_expr"), exact), human(v["params"])])
    return rows


def _markdown_table(columns: Iterable[str], rows: Iterable[list[str]]) -> list[str]:
    columns = list(columns)
    return (["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|"]
            + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def markdown(a: Analysis, sort: str | None = None, top: int | None = None) -> str:
    """The same two tables as GitHub markdown, MACs in every digit (formulas' coefficients too)."""
    values = reference(a)
    convs = [row(r, total_macs(a), values, exact=True) for r in select(a.convs, sort, top, values)]
    note = reference_note(a, sort)
    return "\n".join(_markdown_table(COLUMNS, convs) + ([note] if note else []) + [""]
                     + _markdown_table(KIND_COLUMNS, kind_rows(a, exact=True))) + "\n"


# ---- memory and time ------------------------------------------------------------------------------
COST_COLUMNS = ("name", "kind", "% MACs", "weights", "activations", "MAC/B", "bound")
TIME_COLUMNS = ("time ms", "% time", "reorder ms", "GMAC/s", "× roofline")


def _num(v: "float | None", spec: str) -> str:
    return "?" if v is None else format(v, spec)


def cost_rows(a: Analysis, sort: str | None = None, top: int | None = None) -> tuple[tuple[str, ...], list[list[str]]]:
    """Columns and rows of the memory/time table: bytes, intensity, bound, and the measured time when profiled."""
    timed = a.profile is not None
    columns = COST_COLUMNS + (TIME_COLUMNS if timed else ())
    rows = []
    values = reference(a)
    for r in select(a.convs, sort, top, values):
        name = f"{r.graph}/{r.name or r.node_id}" if r.graph else (r.name or r.node_id)
        cells = [name, _kind(r), _share(r, total_macs(a), values),
                 human(r.weight_bytes) + "B" if r.weight_bytes is not None
                 else "?", human(r.activation_bytes) + "B" if r.activation_bytes is not None else "?",
                 _num(r.intensity, ".1f"), r.bound or "?"]
        if timed:
            cells += [_num(r.time_ms, ".3f"), _num(None if r.time_share is None else 100 * r.time_share, ".1f"),
                      _num(r.reorder_ms, ".3f"), _num(r.gmacs, ".1f"), _num(r.roofline_gap, ".1f")]
        rows.append(cells)
    return columns, rows


def cost_notes(a: Analysis) -> list[str]:
    """The lines under the memory/time table: the roofline, and the profile's totals."""
    lines = [a.roofline.summary() if a.roofline is not None else "roofline: not measured (needs onnxruntime)"]
    p = a.profile
    if p is not None:
        threads = "default threads" if p.threads is None else f"{p.threads} thread{'s' * (p.threads != 1)}"
        share = f" ({100 * p.convs_time_ms / p.kernels_ms:.0f}%)" if p.kernels_ms > 0 else ""
        lines.append(f"model {p.time_ms:.3f} ms (median of {p.runs} runs after {p.warmup} warm-up, {p.provider}, "
                     f"{threads}, optimization {p.opt_level}); kernels' medians {p.kernels_ms:.3f} ms, of which "
                     f"convs {p.convs_time_ms:.3f} ms{share}, NCHWc reorders {p.reorder_ms:.3f} ms")
        if p.other_ms:
            lines.append("other ops: " + ", ".join(f"{op} {ms:.3f} ms" for op, ms in list(p.other_ms.items())[:6]))
    return lines


def cost_markdown(a: Analysis, sort: str | None = None, top: int | None = None) -> str:
    """The memory/time table as GitHub markdown, its notes below it."""
    columns, rows = cost_rows(a, sort, top)
    return "\n".join(_markdown_table(columns, rows) + [""] + cost_notes(a)) + "\n"


# ---- Graphviz DOT ---------------------------------------------------------------------------------
def _q(*lines: str) -> str:
    """A quoted DOT string; several lines are joined by DOT's line break."""
    esc = [s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") for s in lines]
    return '"' + "\\n".join(esc) + '"'


def heat_color(x: float) -> str:
    """White (0) to red (1), as a DOT colour."""
    v = round(255 * (1 - min(max(x, 0.0), 1.0)))
    return f"#ff{v:02x}{v:02x}"


def dot(a: Analysis) -> str:
    """Graphviz DOT of the model's ops (subgraphs as clusters), convs filled by kind, or by their share of the
    model's time when profiled; initializers left out."""
    records = {(r.graph, r.node_id): r for r in a.convs}
    shares = [r.time_share for r in a.convs if r.time_share]
    heat = max(shares) if a.profile is not None and shares else None
    lines = ["digraph convgraph {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fillcolor="#eeeeee", '
             'fontname="Helvetica", fontsize=10];', '  edge [color="#777777", arrowsize=0.6];']
    if heat is None:
        for kind, color in KIND_COLORS.items():
            lines.append(f"  // {kind}: {color}")
    else:
        lines.append(f"  // convs filled white → red by share of the model's time (red: {100 * heat:.1f}%)")
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
                    text = [r.name or nid, f"{r.kind} {_geometry(r)}",
                            f"{r.in_channels}→{r.out_channels}  {cost(r.macs, r.macs_expr)} MACs"]
                    if heat is None:
                        fill, font = KIND_COLORS[r.kind], "white"
                    else:  # profiled: white → red by share of the model's time
                        fill, font = heat_color((r.time_share or 0) / heat), "black"
                        text.append(f"{_num(r.time_ms, '.3f')} ms, {100 * (r.time_share or 0):.1f}% of time")
                    lines.append(f'{indent}{key} [label={_q(*text)}, fillcolor="{fill}", fontcolor="{font}"];')
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
