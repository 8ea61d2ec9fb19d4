"""A reference size for what needs numbers where the MACs are formulas: ranking convs, deciding whether a
rewrite would add MACs, the share it saves.

Dims left dynamic are symbols (:mod:`convgraph.propagate`); a decision such as "low-rank would make this
128→1 pointwise conv dearer" or "this conv has the most MACs" holds at nearly any size, so it is taken at
one stated size: every symbol of an input's first axis (the batch) is 1, every other one
:data:`REFERENCE_DIM`. A dim nothing is known of counts as :data:`REFERENCE_DIM` too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .arithmetic import conv_macs, conv_transpose_macs
from .expr import Expr
from .record import ConvRecord

#: The value of every symbol but a batch's at the reference size.
REFERENCE_DIM = 640


def reference_values(symbols: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Symbol → its value at the reference size (``symbols`` as :attr:`Analysis.symbols` gives them)."""
    return {s: 1 if info.get("axis") == 0 else REFERENCE_DIM for s, info in symbols.items()}


def describe(values: Mapping[str, int]) -> str:
    """The reference size in words: ``N=1, H=W=640``."""
    by_value: dict[int, list[str]] = {}
    for s, v in values.items():
        by_value.setdefault(v, []).append(s)
    return ", ".join("=".join([*names, str(v)]) for v, names in by_value.items())


def value(x, values: Mapping[str, int]) -> Any:
    """An int or Expr at the reference size (an int, or a Fraction; a symbol not in ``values`` at
    :data:`REFERENCE_DIM`); anything else (None) as it is."""
    if isinstance(x, Expr):
        env = dict.fromkeys(x.symbols(), REFERENCE_DIM)
        env.update(values)
        return x.evaluate(env)
    return x


def at_reference(rec: ConvRecord, values: Mapping[str, int]) -> ConvRecord:
    """``rec`` itself when its MACs are known; else a copy at the reference size: its shapes' dims evaluated
    (unknown ones :data:`REFERENCE_DIM`, a shape unknown altogether made of them) and its MACs counted there."""
    if rec.macs is not None or rec.in_channels is None or rec.out_channels is None:
        return rec
    nd = len(rec.kernel)

    def concrete(shape, channels: int) -> tuple:
        if shape is None:
            return (1, channels, *[REFERENCE_DIM] * nd)
        dims = [value(d, values) for d in shape]
        return tuple(int(d) if isinstance(d, (int, float)) and d >= 1 else REFERENCE_DIM for d in dims)

    x, y = concrete(rec.input_shape, rec.in_channels), concrete(rec.output_shape, rec.out_channels)
    if rec.kind == "transposed":
        macs = conv_transpose_macs(x, rec.out_channels // rec.group, rec.kernel)
    else:
        macs = conv_macs(y, rec.in_channels // rec.group, rec.kernel)
    return dataclasses.replace(rec, input_shape=x, output_shape=y, macs=macs, macs_expr=macs, rewrites=[])
