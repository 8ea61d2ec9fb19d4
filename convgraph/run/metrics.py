"""Comparing a candidate's tensors with a reference's: tolerance, metrics judged per sample, degeneracy.

An element fails only when its abs error exceeds atol AND its relative error exceeds rtol (polygraphy's
rule); NaN always fails. Cosine and SNR are judged per sample: the worst sample counts, not a pooled
figure in which strong samples hide weak ones. A reference sample that says nothing (every value under
the tolerance, constant, or saturated) cannot show a difference: it is left out of the per-sample
figures, and a tensor with no informative sample is *inconclusive* — never a pass — unless the candidate
is bitwise identical. Everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UsageError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
TOPK = 5
#: A reference whose values all lie within this of 0 says nothing (when no smaller atol is given).
TINY = DEFAULT_ATOL
#: ... or whose range is below this share of its largest magnitude (constant).
CONSTANT_SPREAD = 1e-6
#: ... or with at least this share of its elements at its extreme value (saturated), counted from
SATURATED_SHARE = 0.999
SATURATED_MIN_ELEMENTS = 1000


@dataclass(frozen=True)
class Tolerance:
    """What passes: elementwise atol/rtol (polygraphy's rule), cosine similarity, or both.

    Given only ``min_cosine``, the cosine alone decides (atol = rtol = 0 then only serve to report
    the smallest tolerances that would pass); otherwise unset atol/rtol take the defaults.
    """

    atol: float
    rtol: float
    min_cosine: float | None
    elementwise: bool

    @classmethod
    def make(cls, atol: float | None = None, rtol: float | None = None, min_cosine: float | None = None) -> "Tolerance":
        for name, v in (("atol", atol), ("rtol", rtol)):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise UsageError(f"--{name} must be a finite number >= 0, got {v}")
        if min_cosine is not None and not -1 <= min_cosine <= 1:
            raise UsageError(f"--min-cosine must be between -1 and 1, got {min_cosine}")
        if min_cosine is not None and atol is None and rtol is None:
            return cls(0.0, 0.0, float(min_cosine), False)
        return cls(DEFAULT_ATOL if atol is None else float(atol), DEFAULT_RTOL if rtol is None else float(rtol),
                   None if min_cosine is None else float(min_cosine), True)

    def describe(self) -> str:
        parts = [f"atol {self.atol:g}, rtol {self.rtol:g}"] if self.elementwise else []
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return " and ".join(parts)


@dataclass
class Metrics:
    """Differences between a reference tensor and a candidate tensor, over all samples compared."""

    name: str
    shape: tuple | None = None  # the reference's, first sample
    dtype: str = ""
    samples: int = 0
    elements: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    mean_abs_err: float = 0.0
    max_abs_ref: float = 0.0  # largest |reference| element: the scale for scaled_err
    scaled_err: float = 0.0  # max_abs_err / max_abs_ref: the "relative error" of exact-rewrite checks
    cosine: float = 1.0
    snr_db: float = math.inf
    nan: int = 0  # elements that are NaN in either model (always failures)
    mismatches: int = 0  # elements outside atol/rtol (NaN included)
    min_atol: float = 0.0  # smallest atol that passes every element at the given rtol
    min_rtol: float = 0.0  # smallest rtol that passes every element at the given atol
    top1: float | None = None  # class-score-like outputs: fraction of rows with the same argmax
    topk: float | None = None  # ... mean overlap of the top-k sets
    k: int | None = None
    passed: bool = True
    error: str | None = None  # e.g. a shape mismatch: then nothing else is meaningful
    # per sample: ``cosine`` and ``snr_db`` above are the worst informative sample's
    sample_cosine: list = field(default_factory=list)  # per sample; None where the reference is degenerate
    sample_snr_db: list = field(default_factory=list)
    worst_sample: int | None = None  # the sample with the lowest cosine
    pooled_cosine: float = 1.0  # over all samples at once (strong samples dominate it)
    degenerate_samples: list = field(default_factory=list)  # samples whose reference says nothing
    degenerate_reason: str | None = None  # why, for the first of them
    inconclusive: bool = False  # no informative sample, and the candidate is not identical

    @property
    def verdict(self) -> str:
        """``passed``, ``failed`` (a difference was seen) or ``inconclusive`` (nothing could be seen)."""
        return "passed" if self.passed else "inconclusive" if self.inconclusive else "failed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = None if self.shape is None else list(self.shape)
        d["verdict"] = self.verdict
        return d


def degenerate(ref: np.ndarray, tiny: float = TINY) -> str | None:
    """Why the reference tensor ``ref`` (one sample) cannot show a difference, or None when it can:
    every finite value within ``tiny`` of 0, a constant, or saturated (nearly all at one extreme)."""
    r = np.asarray(ref)
    if r.dtype.kind not in "fiu" or r.size == 0:
        return None if r.size else "empty"
    r = r.astype(np.float64, copy=False).ravel()
    r = r[np.isfinite(r)]
    if r.size == 0:
        return "no finite value"
    lo, hi = float(r.min()), float(r.max())
    top = max(abs(lo), abs(hi))
    if top <= tiny:
        return f"every value within {tiny:g} of 0 (largest |value| {top:.3g})"
    if r.size > 1 and hi - lo <= CONSTANT_SPREAD * top:
        return f"constant ({hi:.6g})"
    if r.size >= SATURATED_MIN_ELEMENTS:
        for v in (lo, hi):
            share = np.count_nonzero(r == v) / r.size
            if share >= SATURATED_SHARE:
                return f"saturated ({share:.2%} of the values are {v:.6g})"
    return None


def cosine(dot: float, rr: float, cc: float) -> float:
    """Cosine similarity from the sums r·c, r·r and c·c (1 for two zero tensors, 0 for one)."""
    norm = math.sqrt(rr) * math.sqrt(cc)
    if norm == 0:
        return 1.0 if rr == cc == 0 else 0.0
    return max(-1.0, min(1.0, dot / norm))


def _snr(rr: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(rr / noise) if rr > 0 else -math.inf


class Accumulator:
    """Folds (reference, candidate) pairs of one tensor into :class:`Metrics`, sample by sample."""

    def __init__(self, name: str, tol: Tolerance):
        self.m, self.tol = Metrics(name), tol
        # the smallest magnitude that can show a difference: atol when one is set, else the default
        self.tiny = tol.atol if tol.elementwise and tol.atol > 0 else TINY
        self._sum_abs = self._dot = self._rr = self._cc = self._noise = 0.0
        self._finite = 0
        self._rows = self._top1 = 0
        self._topk = 0.0
        self._identical = True

    def update(self, ref: np.ndarray, cand: np.ndarray) -> bool:
        """Add one sample; True when it is within tolerance (a degenerate sample counts as within)."""
        m, tol = self.m, self.tol
        ref, cand = np.asarray(ref), np.asarray(cand)
        index = m.samples
        if m.samples == 0:
            m.shape, m.dtype = tuple(ref.shape), ref.dtype.name if ref.dtype == cand.dtype else f"{ref.dtype.name}/{cand.dtype.name}"
        m.samples += 1
        if ref.shape != cand.shape:
            m.error = f"shape {list(cand.shape)} in the candidate, {list(ref.shape)} in the reference"
            m.passed = self._identical = False
            return False
        if ref.dtype.kind not in "fiubc" or cand.dtype.kind not in "fiubc":
            m.error = f"non-numeric tensor ({ref.dtype.name}); compared for equality"
            ok = bool(np.array_equal(ref, cand))
            m.passed &= ok
            self._identical &= ok
            return ok
        r, c = ref.astype(np.float64, copy=False).ravel(), cand.astype(np.float64, copy=False).ravel()
        m.elements += r.size
        finite_ref = r[np.isfinite(r)]
        if finite_ref.size:
            m.max_abs_ref = max(m.max_abs_ref, float(np.abs(finite_ref).max()))
        self._update_topk(ref, cand)
        why = degenerate(ref, self.tiny) if ref.dtype.kind != "b" else None
        if why is not None:
            m.degenerate_samples.append(index)
            m.degenerate_reason = m.degenerate_reason or why
        if ref.dtype == cand.dtype and np.array_equal(ref, cand):  # identical, NaN-free: the common case
            rr = float(r @ r)
            if math.isfinite(rr):
                self._finite += r.size
                self._dot, self._rr, self._cc = self._dot + rr, self._rr + rr, self._cc + rr
                m.sample_cosine.append(None if why else 1.0)
                m.sample_snr_db.append(None if why else math.inf)
                return True
        self._identical = False
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            d = c - r
            absdiff = np.abs(d)
            finite_all = bool(np.isfinite(absdiff).all())
            if not finite_all:
                absdiff[r == c] = 0.0  # equal infinities: no error
            rel = absdiff / np.abs(r)  # x / 0 = inf
            rel[absdiff == 0] = 0.0
            if not finite_all:
                rel[np.isinf(absdiff)] = np.inf
        nan = np.isnan(absdiff) if not finite_all else None  # NaN in either model
        nan_count = int(np.count_nonzero(nan)) if nan is not None else 0
        bad = (absdiff > tol.atol) & (rel > tol.rtol)
        if nan_count:
            bad |= nan
        mism = int(np.count_nonzero(bad))
        m.nan += nan_count
        m.mismatches += mism
        fails = mism > 0 if tol.elementwise else nan_count > 0
        a, rv = (absdiff, rel) if not nan_count else (absdiff[~nan], rel[~nan])
        if a.size:
            m.max_abs_err = max(m.max_abs_err, float(a.max()))
            m.max_rel_err = max(m.max_rel_err, float(rv.max()))
            self._sum_abs += float(a.sum())
            need_atol = a[rv > tol.rtol]
            need_rtol = rv[a > tol.atol]
            m.min_atol = max(m.min_atol, float(need_atol.max()) if need_atol.size else 0.0)
            m.min_rtol = max(m.min_rtol, float(need_rtol.max()) if need_rtol.size else 0.0)
        if not finite_all:
            keep = np.isfinite(r) & np.isfinite(c)
            r, c, d = r[keep], c[keep], d[keep]
        self._finite += r.size
        dot, rr, cc, noise = float(r @ c), float(r @ r), float(c @ c), float(d @ d)
        self._dot, self._rr, self._cc, self._noise = self._dot + dot, self._rr + rr, self._cc + cc, self._noise + noise
        cos = None if why or not r.size else cosine(dot, rr, cc)
        m.sample_cosine.append(cos)
        m.sample_snr_db.append(None if why or not r.size else _snr(rr, noise))
        if cos is not None and tol.min_cosine is not None and not cos >= tol.min_cosine:
            fails = True
        ok = not fails
        m.passed &= ok
        return ok

    def _update_topk(self, ref: np.ndarray, cand: np.ndarray) -> None:
        shape = list(ref.shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape.pop()
        if ref.dtype.kind != "f" or len(shape) != 2 or shape[1] < 2 or shape[0] < 1:
            return
        r, c = ref.reshape(shape).astype(np.float64), cand.reshape(shape).astype(np.float64)
        if np.isnan(r).any() or np.isnan(c).any():
            return
        k = min(TOPK, shape[1] - 1) or 1
        self.m.k = k
        self._rows += shape[0]
        self._top1 += int(np.count_nonzero(r.argmax(1) == c.argmax(1)))
        tr, tc = np.argpartition(-r, k - 1, axis=1)[:, :k], np.argpartition(-c, k - 1, axis=1)[:, :k]
        self._topk += sum(len(set(a) & set(b)) / k for a, b in zip(tr.tolist(), tc.tolist()))

    def result(self) -> Metrics:
        m = self.m
        if m.error is not None and m.elements == 0:
            m.cosine, m.snr_db, m.pooled_cosine = math.nan, math.nan, math.nan
            return m
        valid = m.elements - m.nan
        m.scaled_err = m.max_abs_err / m.max_abs_ref if m.max_abs_ref else (0.0 if m.max_abs_err == 0 else math.inf)
        m.mean_abs_err = self._sum_abs / valid if valid else math.nan
        if self._finite == 0:
            m.pooled_cosine = math.nan
        elif self._noise == 0 and self._rr > 0:
            m.pooled_cosine = 1.0  # identical: no rounding in the ratio
        else:
            m.pooled_cosine = cosine(self._dot, self._rr, self._cc)
        judged = [(v, i) for i, v in enumerate(m.sample_cosine) if v is not None]
        if judged:  # the worst informative sample counts
            m.cosine, m.worst_sample = min(judged)
            m.snr_db = min(v for v in m.sample_snr_db if v is not None)
        else:  # nothing informative: the pooled figures, for information only
            m.cosine = m.pooled_cosine
            m.snr_db = _snr(self._rr, self._noise)
            if m.error is None and not self._identical and m.samples:
                m.inconclusive = m.passed  # a failure seen stays a failure
                m.passed = False
        if self._rows:
            m.top1, m.topk = self._top1 / self._rows, self._topk / self._rows
        if m.nan:
            m.passed = False
        return m


def compare(reference, candidate, *, atol: float | None = None, rtol: float | None = None,
            min_cosine: float | None = None, name: str = "") -> Metrics:
    """Metrics of ``candidate`` against ``reference``: two arrays, or two equally long lists of arrays
    (samples), with the same tolerance rules as :func:`verify`."""
    acc = Accumulator(name, Tolerance.make(atol, rtol, min_cosine))
    many = isinstance(reference, (list, tuple))
    if many and (not isinstance(candidate, (list, tuple)) or len(reference) != len(candidate)):
        raise UsageError("compare: give two arrays or two lists of arrays of the same length")
    for r, c in zip(reference, candidate) if many else [(reference, candidate)]:
        acc.update(r, c)
    return acc.result()


