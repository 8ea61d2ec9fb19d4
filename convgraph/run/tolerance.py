"""How far an exact rewrite may move what it replaces, and what verify accepts by default: by the element type
the model computes in, and for a rewrite of an int8 (QDQ) conv by the noise that quantizing it again adds.

One mechanism for the rewrite engine's checks (each change alone, the model outputs) and verify's defaults:

* float types: an exact rewrite changes only the order of accumulation and the rounding of new weights and
  intermediates, a few roundings of the type. The relative tolerance (max abs error / max abs output) is
  max(1e-4, 10 × the type's machine epsilon): 1e-4 for float32 and float64 (as before), 9.8e-3 for float16,
  7.8e-2 for bfloat16. verify's defaults follow the outputs' type the same way (atol and rtol at least that).
* requantized (a QDQ conv rewritten in float, then quantized again): the new nodes round their new activations
  and weights once more; the RMS error against the int8 original may be twice the RMS noise those roundings
  predict (:func:`convgraph.engine.quantize.predicted_noise`). At the model outputs the noise of every layer compounds
  through the rest of the int8 network, so the bound there is measured: the int8 original's own activation
  quantization, the original against its float twin (every activation QuantizeLinear → DequantizeLinear pair
  taken out); the rewritten model may add as much noise power again, so its worst-sample 1 − cosine against the
  original may be twice the twin's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

#: Machine epsilon of the float element types.
EPS: dict[int, float] = {onnx.TensorProto.FLOAT: float(np.finfo(np.float32).eps), onnx.TensorProto.DOUBLE: float(np.finfo(np.float64).eps),
       onnx.TensorProto.FLOAT16: float(np.finfo(np.float16).eps), onnx.TensorProto.BFLOAT16: 2.0 ** -7}
#: The relative tolerance of exact rewrites in float32 (and the least for any type).
FLOOR = 1e-4
#: How many machine epsilons an exact rewrite in a narrower type may move its output (relative).
ROUNDINGS = 10
#: A requantized exact rewrite's RMS error may be this many times the noise its new roundings predict.
NOISE_MARGIN = 2.0


@dataclass(frozen=True)
class Bound:
    """What an exact rewrite is held to: ``measure`` at most ``limit``; ``basis`` says why that much. Measures:
    ``scaled`` (max abs error / max abs output), ``rms`` (the RMS of the error, in the output's units),
    ``distance`` (1 − cosine, of the worst sample)."""

    limit: float
    measure: str
    basis: str

    def holds(self, *, scaled: float | None = None, rms: float | None = None, cosine: float | None = None) -> bool | None:
        """Whether a measured error is within the bound; None when its measure was not taken."""
        v = {"scaled": scaled, "rms": rms, "distance": None if cosine is None else 1.0 - cosine}[self.measure]
        return None if v is None else bool(v <= self.limit)

    def measured(self, *, scaled: float | None = None, rms: float | None = None, cosine: float | None = None) -> float:
        return {"scaled": scaled, "rms": rms, "distance": None if cosine is None else 1.0 - cosine}[self.measure] or 0.0

    def describe(self, limit: str | None = None) -> str:
        """``<measure> ≤ <limit> (<basis>)``; ``limit`` replaces the number (a range over several changes)."""
        what = {"scaled": "max abs error / max abs output", "rms": "RMS error", "distance": "1 − cosine"}[self.measure]
        return f"{what} ≤ {limit or format(self.limit, '.3g')} ({self.basis})"

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(bounds) -> list[str]:
    """One line per kind of bound (measure and basis) among ``bounds``, the limits as a range where they differ."""
    kinds: dict[tuple[str, str], list[Bound]] = {}
    for b in bounds:
        kinds.setdefault((b.measure, b.basis), []).append(b)
    out = []
    for group in kinds.values():
        lo, hi = min(b.limit for b in group), max(b.limit for b in group)
        out.append(group[0].describe(None if lo == hi else f"{lo:.3g}–{hi:.3g}"))
    return out


def type_name(elem_type: int | None) -> str:
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower() if elem_type else "?"


def for_type(elem_type: int | None) -> Bound:
    """The bound of an exact rewrite computing in ``elem_type`` (float32's when unknown or not a float)."""
    eps = EPS.get(elem_type or 0)
    if eps is None:
        return Bound(FLOOR, "scaled", "float32 rounding")
    limit = max(FLOOR, ROUNDINGS * eps)
    basis = (f"{type_name(elem_type)}: {ROUNDINGS} × its machine epsilon {eps:.3g}" if limit > FLOOR
             else f"{type_name(elem_type)} rounding")
    return Bound(limit, "scaled", basis)


def requantized(noise: float) -> Bound:
    """The bound of an exact rewrite of an int8 conv whose new nodes were quantized again, ``noise`` the RMS noise
    their new roundings predict."""
    return Bound(NOISE_MARGIN * noise, "rms",
                 f"int8 requantization: {NOISE_MARGIN:g} × the RMS noise its new roundings predict")


def twin_bound(twin_cosine: float) -> Bound:
    """The bound of a model output of requantized exact rewrites, ``twin_cosine`` the worst-sample cosine of the int8
    original's float twin against it (its own activation quantization noise)."""
    return Bound(NOISE_MARGIN * max(1.0 - twin_cosine, 0.0), "distance",
                 f"{NOISE_MARGIN:g} × the int8 original's own quantization noise there: its float twin (activation "
                 f"QuantizeLinear → DequantizeLinear pairs taken out) at worst-sample cosine {twin_cosine:.6f}")


def verify_defaults(elem_types) -> tuple[float | None, float | None, str | None]:
    """(atol, rtol, why) for verify when the user gave neither: the float32 defaults (None, None, None) unless an
    output is a narrower float, whose rounding needs ROUNDINGS × its epsilon (the widest such output's)."""
    from .metrics import DEFAULT_ATOL, DEFAULT_RTOL

    eps = max((EPS[t] for t in elem_types if t in EPS and EPS[t] > EPS[onnx.TensorProto.FLOAT]), default=None)
    if eps is None:
        return None, None, None
    t = next(t for t in elem_types if EPS.get(t) == eps)
    tol = ROUNDINGS * eps
    return (max(DEFAULT_ATOL, tol), max(DEFAULT_RTOL, tol),
            f"{type_name(t)} outputs: atol and rtol {ROUNDINGS} × its machine epsilon {eps:.3g}")
