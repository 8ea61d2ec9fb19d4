"""Tables that fit the output's width; every command's table goes through :func:`show`.

Each :class:`Column` says what its cells hold: a ``name`` (shortened in the middle when narrow:
``/model.22/cv…/conv/Conv``), a ``num`` (never cut: the column is at least as wide as its longest word,
so a cell may wrap at a space, ``44,236,800 →`` / ``7,680,000``, but no number is ever split) or
``text`` (wrapped at words). A table wider than the output switches to a lighter border; if its columns
still do not fit at their narrowest, the columns with a ``drop`` rank are hidden, lowest rank first
(those with nothing to say first), and the caption names them and how to see them (``--wide``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import click

from . import common

if TYPE_CHECKING:
    from rich.console import JustifyMethod
    from rich.table import Table
    from rich.text import Text

Cell = Union[str, "Text"]

#: Narrowest a name column gets before columns are hidden (names are shortened in the middle to it).
NAME_MIN = 24
#: Narrowest a text column gets (its cells wrap at words below their natural width)...
TEXT_MIN = 16
#: ... and words longer than this may be folded rather than widen it.
TEXT_WORD_MAX = 20
#: Narrowest a name or text column gets when nothing more can be hidden.
SQUEEZED_MIN = 8
#: Cells and headers up to this wide are never wrapped (longer ones wrap at spaces).
UNBROKEN_MAX = 14
#: Cells that say nothing: a droppable column made only of these goes first.
EMPTY = frozenset({"", "-", "?"})
#: Set by ``--wide``: tables take the width they need, whatever the output's width.
_WIDE = {"on": False}


@dataclass(frozen=True)
class Column:
    """One table column: its header, what it holds (``name``/``num``/``text``) and when it may go."""

    header: str
    kind: str = "text"  # "name": shortened in the middle; "num": never cut; "text": wrapped at words; "line":
    # text never cut either (a note that wrapped into a column of single words reads worse than one hidden)
    justify: JustifyMethod | None = None  # default: right for numbers, left otherwise
    drop: int | None = None  # narrow outputs hide droppable columns, lowest rank first; None: always shown
    brief: str | None = None  # the header when the table is narrowed (default: header)

    @property
    def align(self) -> JustifyMethod:
        return self.justify or ("right" if self.kind == "num" else "left")


def _set_wide(ctx, param, value) -> None:
    _WIDE["on"] = bool(value)


wide_option = click.option("--wide", is_flag=True, expose_value=False, callback=_set_wide,
                           help="Tables take the width they need: no hidden columns, no shortened names.")


def shorten(text: str, width: int) -> str:
    """``text`` cut in the middle to at most ``width`` characters: '/model.22/cv…/conv/Conv'."""
    if len(text) <= width:
        return text
    if width < 2:
        return "…"[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _cut(text: str, width: int, head: int) -> str:
    """``text`` with its middle cut so that ``head`` characters stay before the '…' (``width`` in all)."""
    return text if len(text) <= width else text[:head] + "…" + text[len(text) - (width - 1 - head):]


def shorten_all(names: Sequence[str], width: int) -> list[str]:
    """Each name shortened as :func:`shorten` does, except where that would show two different names alike
    (YOLOv8n's head: ``/model.22/cv2.0/cv2.0.0/conv/Conv`` and ``/model.22/cv3.0/cv3.0.0/conv/Conv``): such a
    group is cut elsewhere, where the names differ, hiding what they share (``…2/cv2.0/cv2.0.0/conv/Conv``)."""
    out = [shorten(n, width) for n in names]
    if width < 2:
        return out
    rows: dict[str, list[int]] = {}  # shown text -> the rows showing it
    for i, o in enumerate(out):
        rows.setdefault(o, []).append(i)
    for o, idx in list(rows.items()):
        group = sorted({names[i] for i in idx})
        if len(group) < 2:
            continue
        best = None
        for head in range(width):
            cuts = {n: _cut(n, width, head) for n in group}
            if len(set(cuts.values())) < len(group) or any(c in rows and c != o for c in cuts.values()):
                continue
            hidden = {n[head:len(n) - (width - 1 - head)] for n in group if len(n) > width}
            score = (len(hidden), abs(head - (width - 1) // 2))  # hide what the names share, near the middle
            if best is None or score < best[0]:
                best = (score, cuts)
        if best is None:
            continue  # too narrow to tell them apart: left as they are
        del rows[o]
        for i in idx:
            out[i] = best[1][names[i]]
            rows.setdefault(out[i], []).append(i)
    return out


def _plain(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell.plain


def _longest_word(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(w) for w in text.split()), default=0)


def _longest_line(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.splitlines()), default=0)


def _unbroken(text: str) -> int:
    """The narrowest width that keeps ``text`` readable: all of it when short, else its longest word."""
    line = _longest_line(text)
    return line if line <= UNBROKEN_MAX else _longest_word(text)


def _limits(col: Column, cells: list[str], header: str) -> tuple[int, int]:
    """(narrowest, natural) width of a column's content under ``header``."""
    natural = max([_longest_line(header), *map(_longest_line, cells)])
    head = min(_unbroken(header), TEXT_WORD_MAX)
    if col.kind == "num":
        least = max([head, *map(_unbroken, cells)])
    elif col.kind == "line":
        least = natural
    elif col.kind == "name":
        least = min(natural, max(head, NAME_MIN))
    else:
        least = min(natural, max([head, TEXT_MIN, *(min(_longest_word(c), TEXT_WORD_MAX) for c in cells)]))
    return least, natural


@lru_cache(maxsize=None)
def _overhead(light: bool, n: int) -> int:
    """Border and padding width of an ``n``-column table, measured on rich's own rendering."""
    from rich.console import Console
    from rich.measure import Measurement

    t = _table(light, None)
    for _ in range(n):
        t.add_column(width=1)
    console = Console(width=10_000)
    return Measurement.get(console, console.options, t).maximum - n


def _table(light: bool, title: str | None, caption: str | None = None) -> "Table":
    from rich import box
    from rich.table import Table

    if light:  # no outer frame and no vertical rules: 2 characters between columns
        return Table(title=title, caption=caption, title_justify="left", caption_justify="left",
                     box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    return Table(title=title, caption=caption, title_justify="left", caption_justify="left")


def _grow(widths: dict[int, int], natural: dict[int, int], cols: list[int], spare: int) -> int:
    """Widen ``cols`` towards their natural width, sharing ``spare`` in proportion to what each lacks."""
    want = {c: natural[c] - widths[c] for c in cols if natural[c] > widths[c]}
    total = sum(want.values())
    if not total or spare <= 0:
        return spare
    if total <= spare:
        for c, w in want.items():
            widths[c] += w
        return spare - total
    given = 0
    for c, w in want.items():
        share = w * spare // total
        widths[c] += share
        given += share
    for c in want:  # the rounding remainder, one each
        if given == spare:
            break
        if widths[c] < natural[c]:
            widths[c] += 1
            given += 1
    return spare - given


def layout(columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
           width: int | None) -> tuple[list[int], dict[int, int], bool]:
    """Which columns to show, how wide, and whether in the light style, to fit ``width`` (None: any)."""
    cells = {i: [_plain(r[i]) for r in rows] for i in range(len(columns))}
    natural = {i: _limits(col, cells[i], col.header)[1] for i, col in enumerate(columns)}
    shown = list(range(len(columns)))
    if width is None or sum(natural.values()) + _overhead(False, len(shown)) <= width:
        return shown, natural, False
    least, natural = {}, {}
    for i, col in enumerate(columns):
        least[i], natural[i] = _limits(col, cells[i], col.brief or col.header)

    def rank(i: int) -> tuple[bool, int]:
        return not all(c.strip() in EMPTY for c in cells[i]), columns[i].drop or 0  # droppable: not None

    while sum(least[i] for i in shown) + _overhead(True, len(shown)) > width:
        droppable = [i for i in shown if columns[i].drop is not None]
        if not droppable:
            break
        shown.remove(min(droppable, key=rank))
    widths = {i: least[i] for i in shown}
    spare = width - _overhead(True, len(shown)) - sum(widths.values())
    for i in shown:  # still too wide: names and text give way (folded), numbers never
        if spare < 0 and columns[i].kind not in ("num", "line"):
            cut = min(-spare, max(widths[i] - SQUEEZED_MIN, 0))
            widths[i] -= cut
            spare += cut
    for kind in ("name", "num", "line", "text"):
        spare = _grow(widths, natural, [i for i in shown if columns[i].kind == kind], spare)
    return shown, widths, True


def build(columns: Sequence[Column], rows: Iterable[Sequence[Cell]], *, title: str | None = None,
          width: int | None = None, hint: str = "--wide shows them") -> tuple["Table", int]:
    """The rich Table of ``rows`` fitted to ``width`` (None: natural widths), and its width."""
    from rich.text import Text

    rows = [[common.printable(c, newlines=columns[i].kind != "name") if isinstance(c, str) else common.safe(c)
             for i, c in enumerate(r)] for r in rows]  # names from the model: no control sequence, no line break
    title = common.printable(title) if title is not None else None
    shown, widths, light = layout(columns, rows, width)
    hidden = [columns[i].header for i in range(len(columns)) if i not in shown]
    caption = f"hidden to fit {width} columns: {', '.join(hidden)} ({hint})" if hidden else None
    t = _table(light, title, caption)
    for i in shown:
        col = columns[i]
        t.add_column(col.brief or col.header if light else col.header, justify=col.align, width=widths[i],
                     overflow="fold")
    short = {i: shorten_all([str(r[i]) for r in rows], widths[i]) for i in shown
             if columns[i].kind == "name" and all(isinstance(r[i], str) for r in rows)}
    for k, r in enumerate(rows):
        cells = []
        for i in shown:
            c = r[i]
            cells.append(Text(short[i][k] if i in short else c) if isinstance(c, str) else c)
        t.add_row(*cells)
    return t, sum(widths.values()) + _overhead(light, len(shown))


def show(columns: Sequence[Column], rows: Iterable[Sequence[Cell]], *, title: str | None = None,
         hint: str = "--wide shows them") -> None:
    """Print a table on stdout, fitted to its width unless ``--wide``."""
    from rich.cells import cell_len

    out = common.console("out")
    t, need = build(columns, rows, width=None if _WIDE["on"] else out.width, hint=hint)
    if title is not None:  # a title longer than the table is a line of its own: rich would wrap it to the table
        title = common.printable(title)
        if cell_len(title) <= need:
            t.title = title
        else:
            out.print(title, markup=False, highlight=False)
    width = out.width
    out.width = max(need, width)  # a table wider than the output (--wide) is printed whole, never cropped
    try:
        out.print(t, crop=False)
    finally:
        out.width = width
