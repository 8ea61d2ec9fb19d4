"""Pure convolution arithmetic: resolved pads, output sizes, MACs, params, receptive-field steps.

Per spatial dim: input size ``i``, kernel ``k``, stride ``s``, dilation ``d``, pads ``p_b``/``p_e``.
Sizes may be unknown (``None`` or a symbolic name): results that depend on them are ``None``. The output
sizes also take :class:`~convgraph.model.expr.Expr` sizes (dims left dynamic) and give Exprs; MAC counts stay
ints (:func:`elements` is the symbolic count).
``pads`` are ONNX order: all begins, then all ends.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Iterable, Sequence, TypeGuard

from .expr import Expr

Dim = "int | str | None"

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def known(d) -> TypeGuard[int]:
    """Is ``d`` a concrete size (an int, not a symbolic name or None)?"""
    return type(d) is int or (isinstance(d, numbers.Integral) and not isinstance(d, bool))


def sized(d) -> bool:
    """A concrete or symbolic size (an int or an :class:`~convgraph.model.expr.Expr`), not unknown."""
    return type(d) is int or isinstance(d, Expr) or known(d)


def prod(values: Iterable[int]) -> int:
    return math.prod(map(int, values))


def _split_pads(pads: Sequence[int], nd: int) -> tuple[list[int], list[int]]:
    pads = list(pads) if pads else [0] * (2 * nd)
    return pads[:nd], pads[nd:]


def effective_kernel(k: int, d: int) -> int:
    """Extent of a dilated kernel: d·(k−1)+1."""
    return d * (k - 1) + 1


def conv_pads(in_spatial: Sequence, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              pads: Sequence[int] = (), auto_pad: str = "NOTSET") -> tuple[int | None, ...]:
    """Conv pads resolved from ``auto_pad`` (``pads`` when NOTSET); None where SAME needs an unknown size."""
    nd = len(kernel)
    if auto_pad in ("NOTSET", ""):
        b, e = _split_pads(pads, nd)
        return tuple(b + e)
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    begins: list = []  # ints, Exprs, None where unknown
    ends: list = []
    for i, k, s, d in zip(in_spatial, kernel, strides, dilations):
        if not known(i):
            begins.append(None)
            ends.append(None)
            continue
        o = -(-i // s)
        total = max(0, (o - 1) * s + effective_kernel(k, d) - i)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_LOWER":
            begins.append(big)
            ends.append(small)
        else:
            begins.append(small)
            ends.append(big)
    return tuple(begins + ends)


def conv_output_spatial(in_spatial: Sequence, kernel: Sequence[int], strides: Sequence[int],
                        dilations: Sequence[int], pads: Sequence[int] = (), auto_pad: str = "NOTSET") -> tuple:
    """Spatial output size of an ONNX Conv (or pool with these attributes); None per unknown dim."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-i // s) if sized(i) else None for i, s in zip(in_spatial, strides))
    rp = conv_pads((0,) * nd, kernel, strides, dilations, pads, auto_pad)  # NOTSET/VALID: no size needed
    out: list = []
    for j, (i, k, s, d) in enumerate(zip(in_spatial, kernel, strides, dilations)):
        if not sized(i):
            out.append(None)
            continue
        out.append((i + rp[j] + rp[j + nd] - effective_kernel(k, d)) // s + 1)
    return tuple(out)


def pool_output_spatial_ceil(in_spatial: Sequence, kernel: Sequence[int], strides: Sequence[int],
                             dilations: Sequence[int], pads: Sequence[int] = (), auto_pad: str = "NOTSET") -> tuple:
    """A pool's output size with ``ceil_mode=1``: ⌈(i + p_b + p_e − k_eff)/s⌉ + 1, less the last window when it
    would start in the end padding (decided for ints; Exprs assume it does not)."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return conv_output_spatial(in_spatial, kernel, strides, dilations, pads, auto_pad)
    nd = len(kernel)
    b, e = _split_pads(pads, nd)
    out: list = []
    for j, (i, k, s, d) in enumerate(zip(in_spatial, kernel, strides, dilations)):
        if not sized(i):
            out.append(None)
            continue
        o = -(-(i + b[j] + e[j] - effective_kernel(k, d)) // s) + 1
        if known(i) and (o - 1) * s >= i + b[j]:
            o -= 1
        out.append(o)
    return tuple(out)


def _transpose_pad_split(total: int, auto_pad: str) -> tuple[int, int]:
    """How a ConvTranspose total pad is split: the odd unit at the end for SAME_UPPER, else at the start.

    This is the ONNX spec's formula, and what onnxruntime 1.32 and onnx's reference implementation do
    (measured; older onnxruntime sources split it the other way).
    """
    if auto_pad == "SAME_UPPER":
        return total // 2, total - total // 2
    return total - total // 2, total // 2


def conv_transpose_geometry(in_spatial: Sequence, kernel: Sequence[int], strides: Sequence[int],
                            dilations: Sequence[int], pads: Sequence[int] = (), auto_pad: str = "NOTSET",
                            output_padding: Sequence[int] = (), output_shape: Sequence[int] = ()
                            ) -> tuple[tuple, tuple]:
    """ConvTranspose (resolved pads, spatial output size).

    o = s·(i−1) + output_padding + d·(k−1) + 1 − p_b − p_e. With ``output_shape`` (its last len(kernel)
    entries) the output size is given and the pads derived from it; with SAME_* the output is i·s.
    """
    nd = len(kernel)
    adj = list(output_padding) if output_padding else [0] * nd
    explicit = list(output_shape)[-nd:] if output_shape else None
    pb, pe = _split_pads(pads, nd)
    begins: list = []
    ends: list = []
    out: list = []
    for j, (i, k, s, d) in enumerate(zip(in_spatial, kernel, strides, dilations)):
        full = s * (i - 1) + adj[j] + effective_kernel(k, d) if sized(i) else None
        if explicit is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = explicit[j] if explicit is not None else (i * s if sized(i) else None)
            if full is None or target is None or not known(full):
                begins.append(None)
                ends.append(None)
                out.append(target)
                continue
            b, e = _transpose_pad_split(max(0, full - target), auto_pad)
        elif auto_pad == "VALID":
            b, e = 0, 0
        else:
            b, e = pb[j], pe[j]
        begins.append(b)
        ends.append(e)
        if explicit is not None:
            out.append(explicit[j])  # a target above the full size is filled at the end, like output_padding
        else:
            out.append(full - b - e if full is not None else None)
    return tuple(begins + ends), tuple(out)


def numel(shape: Sequence | None) -> int | None:
    """Elements of a tensor of this shape; None when the shape or any dim is unknown."""
    if shape is None:
        return None
    for d in shape:
        if type(d) is not int and not known(d):
            return None
    return prod(shape)


def elements(shape: Sequence | None) -> "int | Expr | None":
    """Elements of a tensor of this shape as an int or an Expr over the symbols; None when a dim is unknown."""
    if shape is None:
        return None
    n = 1
    for d in shape:
        if not sized(d):
            return None
        n = n * d
    return n


def out_elements(shape: Sequence | None) -> int | None:
    """Batch × spatial positions of a conv output (N, C, *spatial): its elements per channel; None when unknown."""
    return numel((shape[0], *shape[2:])) if shape is not None and len(shape) >= 3 else None


def conv_macs(out_shape: Sequence | None, in_channels_per_group: int | None, kernel: Sequence[int]) -> int | None:
    """Conv MACs: output elements × (C_in / group) × prod(kernel) (bias not counted; dilation adds none)."""
    n = numel(out_shape)
    return None if n is None or in_channels_per_group is None else n * in_channels_per_group * prod(kernel)


def conv_transpose_macs(in_shape: Sequence | None, out_channels_per_group: int | None,
                        kernel: Sequence[int]) -> int | None:
    """ConvTranspose MACs: input elements × (C_out / group) × prod(kernel) (each input pixel scatters one kernel)."""
    n = numel(in_shape)
    return None if n is None or out_channels_per_group is None else n * out_channels_per_group * prod(kernel)


def bias_adds(out_shape: Sequence | None) -> int | None:
    """One add per output element: what a bias costs (onnx-tool counts it into MACs)."""
    return numel(out_shape)


def conv_params(weight_shape: Sequence[int], out_channels: int | None, has_bias: bool) -> int:
    """Weights plus one bias per output channel."""
    return prod(weight_shape) + (int(out_channels or 0) if has_bias else 0)


def rf_step(r: "int | Fraction", j: "int | Fraction", k: int, s: int, d: int = 1,
            transposed: bool = False) -> "tuple[int | Fraction, int | Fraction]":
    """One receptive-field step per spatial dim: (size r, jump j) at the input → at the output.

    Conv/pool: r ← r + (k_eff − 1)·j, j ← j·s. ConvTranspose: the output grid is s times finer
    (j ← j/s) and an output pixel reads ceil(k_eff / s) input pixels: r ← r + (ceil(k_eff/s) − 1)·j.
    Ints stay ints; a jump below one input pixel becomes a Fraction.
    """
    ke = effective_kernel(k, d)
    if transposed:
        return r + (-(-ke // s) - 1) * j, Fraction(j) / s
    return r + (ke - 1) * j, j * s
