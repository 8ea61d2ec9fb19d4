"""Comparing a candidate's tensors with a reference's: tolerance, metrics judged per sample, degeneracy.

An element fails only when its abs error exceeds atol AND its relative error exceeds rtol (polygraphy's
rule); NaN always fails. Cosine and SNR are judged per sample: the worst sample counts, not a pooled
figure in which strong samples hide weak ones. A reference sample that says nothing (every value under
the tolerance, constant, or saturated) cannot show a difference: it is left out of the per-sample
figures, and a tensor with no informative sample is *inconclusive* — never a pass — unless the candidate
is bitwise identical. Everything is computed in float64.

Every part of an output counts: an output that concatenates parts of very different scale (a detector's box
coordinates in pixels beside class scores in [0, 1]) is split along its part axis (the smallest axis after the
batch axis) where the reference's slices on one side are all :data:`PART_GAP` times larger than on the other,
on every informative sample; each part is judged alone and a sample's figure is its worst part's, so scores a
hundred times smaller than the boxes beside them cannot hide in the tensor's cosine. Parts whose reference
says nothing on a sample are left out there, and named.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

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
#: Parts: slices along the part axis (2..PART_AXIS_MAX of them, each of at least PART_MIN_ELEMENTS elements
#: per sample) form separate parts where every slice on one side of a split has PART_GAP times the RMS of every
#: slice on the other, on every informative sample (YOLOv8n: boxes' ~1e2 against class scores' <= 5e-2).
PART_GAP = 30.0
#: A deciding sample whose reference's largest |value| is under this share of the largest over all samples is weak:
#: its cosine follows the candidate's noise relative to a weak signal (YOLOv8n's class scores on an image it detects
#: nothing in: a best score of 0.02 where other images reach 0.6).
WEAK_SHARE = 0.1
PART_AXIS_MAX = 1024
PART_MIN_ELEMENTS = 16


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
class Part:
    """One part of a tensor judged alone: the slices ``start:stop`` along ``axis`` (see the module doc)."""

    name: str  # the tensor's name with the slice, e.g. ``output0[:, 4:22]``
    axis: int
    start: int
    stop: int
    cosine: float = 1.0  # the worst informative sample's
    snr_db: float = math.inf
    worst_sample: int | None = None
    max_abs_err: float = 0.0
    scaled_err: float = 0.0  # max abs error / max |reference| within the part
    sample_cosine: list = field(default_factory=list)  # per sample; None where the part's reference says nothing
    sample_top: list = field(default_factory=list)  # per sample, the largest |reference| within the part
    degenerate_samples: list = field(default_factory=list)
    degenerate_reason: str | None = None


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
    scaled_err: float = 0.0  # max_abs_err / max_abs_ref (the worst part's): the "relative error" of exact checks
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
    sample_top: list = field(default_factory=list)  # per sample, the largest finite |reference| (None: not numeric)
    sample_snr_db: list = field(default_factory=list)
    worst_sample: int | None = None  # the sample with the lowest cosine
    pooled_cosine: float = 1.0  # over all samples at once (strong samples dominate it)
    degenerate_samples: list = field(default_factory=list)  # samples whose reference says nothing
    degenerate_reason: str | None = None  # why, for the first of them
    inconclusive: bool = False  # no informative sample, and the candidate is not identical
    # parts of very different scale, each judged alone (empty: the tensor is one part); a sample's cosine and
    # SNR above are then its worst informative part's
    parts: list[Part] = field(default_factory=list)
    decided_by: str | None = None  # the part whose worst sample gave ``cosine``
    failed_samples: list = field(default_factory=list)  # samples out of tolerance (NaN, elements, cosine)
    note: str | None = None  # e.g. why a cosine means nothing here

    @property
    def verdict(self) -> str:
        """``passed``, ``failed`` (a difference was seen) or ``inconclusive`` (nothing could be seen)."""
        return "passed" if self.passed else "inconclusive" if self.inconclusive else "failed"

    def weak_worst(self) -> tuple[int, float, float] | None:
        """(sample, its reference's largest |value|, the largest over all samples) when the sample that decides the
        cosine (in the part that decides it) has a reference under :data:`WEAK_SHARE` of the strongest sample's."""
        part = next((p for p in self.parts if p.name == self.decided_by), None)
        i, tops = (part.worst_sample, part.sample_top) if part is not None else (self.worst_sample, self.sample_top)
        if not (part.cosine if part is not None else self.cosine) < 1.0:
            return None  # nothing differs: no sample decides anything
        known = [t for t in tops if t is not None]
        if i is None or i >= len(tops) or tops[i] is None or len(known) < 2 or not max(known) > 0:
            return None
        return (i, tops[i], max(known)) if tops[i] < WEAK_SHARE * max(known) else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = None if self.shape is None else list(self.shape)
        d["verdict"] = self.verdict
        weak = self.weak_worst()
        d["weak_worst"] = None if weak is None else {"sample": weak[0], "largest_abs": weak[1], "set_largest_abs": weak[2]}
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
    return _degenerate(lo, hi, r.size, int(np.count_nonzero(r == lo)), int(np.count_nonzero(r == hi)), tiny)


def _degenerate(lo: float, hi: float, n: int, n_lo: int, n_hi: int, tiny: float) -> str | None:
    """:func:`degenerate` from a tensor's finite minimum, maximum, count and the counts at both extremes."""
    if n == 0:
        return "no finite value"
    top = max(abs(lo), abs(hi))
    if top <= tiny:
        return f"every value within {tiny:g} of 0 (largest |value| {top:.3g})"
    if n > 1 and hi - lo <= CONSTANT_SPREAD * top:
        return f"constant ({hi:.6g})"
    if n >= SATURATED_MIN_ELEMENTS:
        for v, k in ((lo, n_lo), (hi, n_hi)):
            if k / n >= SATURATED_SHARE:
                return f"saturated ({k / n:.2%} of the values are {v:.6g})"
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
    """Folds (reference, candidate) pairs of one tensor into :class:`Metrics`, sample by sample.

    :meth:`update` says at once whether a sample is within tolerance as one whole tensor; the parts (see the
    module doc) are only known once every sample is in, so :meth:`result` gives the verdict that counts."""

    def __init__(self, name: str, tol: Tolerance):
        self.m, self.tol = Metrics(name), tol
        # the smallest magnitude that can show a difference: atol when one is set, else the default
        self.tiny = tol.atol if tol.elementwise and tol.atol > 0 else TINY
        self._sum_abs = self._dot = self._rr = self._cc = self._noise = 0.0
        self._finite = 0
        self._rows = self._top1 = 0
        self._topk = 0.0
        self._identical = True
        self._elementwise_fail: list[bool] = []  # per sample: NaN or elements outside atol/rtol
        self._axis: int | None = None  # the part axis, from the first sample's shape
        self._slices: list[np.ndarray | None] = []  # per sample: per-slice sums (see _slice_stats)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> bool:
        """Add one sample; True when it is within tolerance as one whole tensor (a degenerate sample counts
        as within). The verdict that counts, part by part, is :meth:`result`'s."""
        m, tol = self.m, self.tol
        ref, cand = np.asarray(ref), np.asarray(cand)
        index = m.samples
        if m.samples == 0:
            m.shape, m.dtype = tuple(ref.shape), ref.dtype.name if ref.dtype == cand.dtype else f"{ref.dtype.name}/{cand.dtype.name}"
            self._axis = part_axis(ref.shape)
        m.samples += 1
        if ref.shape != cand.shape:
            m.error = f"shape {list(cand.shape)} in the candidate, {list(ref.shape)} in the reference"
            m.passed = self._identical = False
            return self._sample(False, None, None)
        if ref.dtype.kind not in "fiubc" or cand.dtype.kind not in "fiubc":
            m.error = f"non-numeric tensor ({ref.dtype.name}); compared for equality"
            ok = bool(np.array_equal(ref, cand))
            self._identical &= ok
            return self._sample(not ok, None, None)
        if self._axis is not None and ref.shape == m.shape and ref.dtype.kind == "f":
            self._slices.append(_slice_stats(ref, cand, self._axis))
        else:
            self._slices.append(None)
        r, c = ref.astype(np.float64, copy=False).ravel(), cand.astype(np.float64, copy=False).ravel()
        m.elements += r.size
        finite_ref = r[np.isfinite(r)]
        top = float(np.abs(finite_ref).max()) if finite_ref.size else 0.0
        m.max_abs_ref = max(m.max_abs_ref, top)
        m.sample_top.append(top)
        self._update_topk(ref, cand)
        why = degenerate(ref, self.tiny) if ref.dtype.kind != "b" else None
        if why is not None:
            m.degenerate_samples.append(index)
            m.degenerate_reason = m.degenerate_reason or why
        one = r.size == 1  # a cosine of one element is ±1 whatever the error: judged elementwise instead
        if ref.dtype == cand.dtype and np.array_equal(ref, cand):  # identical, NaN-free: the common case
            rr = float(r @ r)
            if math.isfinite(rr):
                self._finite += r.size
                self._dot, self._rr, self._cc = self._dot + rr, self._rr + rr, self._cc + rr
                informative = not why and not one
                return self._sample(False, 1.0 if informative else None, math.inf if informative else None)
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
        # one element and only a cosine asked: the default atol/rtol judge it
        atol, rtol = (tol.atol, tol.rtol) if tol.elementwise or not one else (DEFAULT_ATOL, DEFAULT_RTOL)
        bad = (absdiff > atol) & (rel > rtol)
        if nan is not None and nan_count:
            bad |= nan
        mism = int(np.count_nonzero(bad))
        m.nan += nan_count
        m.mismatches += mism
        fails = mism > 0 if tol.elementwise or one else nan_count > 0
        a, rv = (absdiff[~nan], rel[~nan]) if nan is not None and nan_count else (absdiff, rel)
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
        informative = not why and r.size > 0 and not one
        return self._sample(fails, cosine(dot, rr, cc) if informative else None,
                            _snr(rr, noise) if informative else None)

    def _sample(self, fails: bool, cos: float | None, snr: float | None) -> bool:
        """Record one sample's elementwise failure and whole-tensor figures; True when it passes as a whole."""
        self._elementwise_fail.append(fails)
        self.m.sample_cosine.append(cos)
        self.m.sample_snr_db.append(snr)
        if len(self._slices) < len(self._elementwise_fail):
            self._slices.append(None)
        if len(self.m.sample_top) < len(self._elementwise_fail):
            self.m.sample_top.append(None)
        low = cos is not None and self.tol.min_cosine is not None and not cos >= self.tol.min_cosine
        return not fails and not low

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
            m.passed, m.failed_samples = False, list(range(m.samples))
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
        self._judge_parts()
        judged = [(v, i) for i, v in enumerate(m.sample_cosine) if v is not None]
        scalar = m.shape is not None and math.prod(m.shape) == 1
        if judged:  # the worst informative sample counts
            m.cosine, m.worst_sample = min(judged)
            m.snr_db = min(v for v in m.sample_snr_db if v is not None)
            if m.parts:
                m.decided_by = min((p for p in m.parts if p.worst_sample is not None), key=lambda p: p.cosine).name
        elif scalar:
            m.cosine, m.snr_db = math.nan, math.nan
            atol, rtol = (self.tol.atol, self.tol.rtol) if self.tol.elementwise else (DEFAULT_ATOL, DEFAULT_RTOL)
            m.note = f"one element: a cosine means nothing there; judged by atol {atol:g}, rtol {rtol:g}"
        else:  # nothing informative: the pooled figures, for information only
            m.cosine = m.pooled_cosine
            m.snr_db = _snr(self._rr, self._noise)
        low = self.tol.min_cosine
        m.failed_samples = [i for i, (bad, cos) in enumerate(zip(self._elementwise_fail, m.sample_cosine))
                            if bad or (low is not None and cos is not None and not cos >= low)]
        m.passed = not m.failed_samples and not m.nan
        if not judged and not scalar and m.error is None and not self._identical and m.samples:
            m.inconclusive = m.passed  # a failure seen stays a failure
            m.passed = False
        if self._rows:
            m.top1, m.topk = self._top1 / self._rows, self._topk / self._rows
        return m

    def _judge_parts(self) -> None:
        """Split the tensor into parts (module doc) and make each sample's figures its worst part's."""
        m = self.m
        stats = [s for s in self._slices if s is not None]
        if self._axis is None or len(stats) < len(self._slices) or not stats:
            return
        st = np.stack(stats)  # samples × fields × slices
        informative = [i for i in range(m.samples) if i not in m.degenerate_samples]
        bounds = split_parts(st[informative, _RR] / np.maximum(st[informative, _N], 1))
        if len(bounds) < 2:
            return
        m.parts = [self._part(st, a, b) for a, b in bounds]
        m.scaled_err = max((p.scaled_err for p in m.parts if p.worst_sample is not None), default=m.scaled_err)
        m.degenerate_samples, m.degenerate_reason = [], None
        for i in range(m.samples):
            judged = [p for p in m.parts if p.sample_cosine[i] is not None]
            if judged:
                worst = min(judged, key=lambda p: p.sample_cosine[i])
                m.sample_cosine[i] = worst.sample_cosine[i]
                m.sample_snr_db[i] = min(_part_snr(st[i, :, p.start:p.stop]) for p in judged)
            else:
                m.sample_cosine[i] = m.sample_snr_db[i] = None
                m.degenerate_samples.append(i)
                m.degenerate_reason = m.degenerate_reason or next(
                    p.degenerate_reason for p in m.parts if p.degenerate_reason)

    def _part(self, st: np.ndarray, a: int, b: int) -> Part:
        axis = self._axis or 0
        index = ", ".join([":"] * axis + [f"{a}:{b}"])
        p = Part(f"{self.m.name}[{index}]", axis, a, b)
        s = st[:, :, a:b]
        max_ref = float(s[:, _TOP].max())
        p.sample_top = [float(v) for v in s[:, _TOP].max(axis=1)]
        for i in range(s.shape[0]):
            x = s[i]
            lo, hi = float(x[_LO].min()), float(x[_HI].max())
            why = _degenerate(lo, hi, int(x[_N].sum()), int(x[_NLO][x[_LO] == lo].sum()),
                              int(x[_NHI][x[_HI] == hi].sum()), self.tiny)
            if why:
                p.degenerate_samples.append(i)
                p.degenerate_reason = p.degenerate_reason or why
                p.sample_cosine.append(None)
                continue
            rr, dot, cc, noise = (float(x[f].sum()) for f in (_RR, _DOT, _CC, _NOISE))
            p.sample_cosine.append(1.0 if noise == 0 else cosine(dot, rr, cc))
        judged = [(v, i) for i, v in enumerate(p.sample_cosine) if v is not None]
        if judged:
            p.cosine, p.worst_sample = min(judged)
            p.snr_db = min(_part_snr(st[i, :, a:b]) for _, i in judged)
        err = p.max_abs_err = float(s[:, _ERR].max())
        p.scaled_err = err / max_ref if max_ref else (0.0 if err == 0 else math.inf)
        return p


# the per-slice sums kept per sample (rows of _slice_stats' result)
_RR, _DOT, _CC, _NOISE, _ERR, _TOP, _LO, _HI, _NLO, _NHI, _N = range(11)


def part_axis(shape) -> int | None:
    """The axis a tensor of ``shape`` may be split into parts along: the smallest after the batch axis (the
    first of equals), when it has 2..PART_AXIS_MAX slices of PART_MIN_ELEMENTS elements or more; else None."""
    if len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return None
    axis = min(range(1, len(shape)), key=lambda a: shape[a])
    n = shape[axis]
    if not 2 <= n <= PART_AXIS_MAX or math.prod(shape) // n < PART_MIN_ELEMENTS:
        return None
    return axis


def _slice_stats(ref: np.ndarray, cand: np.ndarray, axis: int) -> np.ndarray:
    """Per slice along ``axis``: Σr², Σrc, Σc², Σ(c−r)², max|c−r|, max|r|, min r, max r, the counts at both
    extremes and the finite count (non-finite elements left out), as an array fields × slices."""
    n = ref.shape[axis]
    r = np.moveaxis(ref, axis, 0).reshape(n, -1).astype(np.float64)
    c = np.moveaxis(cand, axis, 0).reshape(n, -1).astype(np.float64)
    ok_r = np.isfinite(r)
    ok = ok_r & np.isfinite(c)
    r0, c0 = np.where(ok, r, 0.0), np.where(ok, c, 0.0)
    d = c0 - r0
    lo = np.where(ok_r, r, np.inf).min(1)
    hi = np.where(ok_r, r, -np.inf).max(1)
    out = np.empty((11, n))
    out[_RR], out[_DOT], out[_CC], out[_NOISE] = (r0 * r0).sum(1), (r0 * c0).sum(1), (c0 * c0).sum(1), (d * d).sum(1)
    out[_ERR] = np.abs(d).max(1)
    out[_TOP] = np.where(ok_r, np.abs(r), 0.0).max(1)
    out[_LO], out[_HI] = lo, hi
    out[_NLO], out[_NHI] = (r == lo[:, None]).sum(1), (r == hi[:, None]).sum(1)
    out[_N] = ok_r.sum(1)
    return out


def _part_snr(x: np.ndarray) -> float:
    return _snr(float(x[_RR].sum()), float(x[_NOISE].sum()))


def split_parts(power: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous parts of slices from their mean square per sample (samples × slices): split where every
    slice on one side has PART_GAP times the RMS of every slice on the other on every sample, at the widest
    such gap, recursively. [(0, n)] when nothing splits."""
    n = power.shape[1] if power.ndim == 2 else 0
    if power.shape[0] == 0 or n < 2:
        return [(0, n)]
    logs = 0.5 * np.log10(np.maximum(power, 1e-300))
    need = math.log10(PART_GAP)

    def cut(a: int, b: int) -> list[tuple[int, int]]:
        x = logs[:, a:b]
        if x.shape[1] < 2:
            return [(a, b)]
        pmin, pmax = np.minimum.accumulate(x, 1)[:, :-1], np.maximum.accumulate(x, 1)[:, :-1]
        smin = np.minimum.accumulate(x[:, ::-1], 1)[:, ::-1][:, 1:]
        smax = np.maximum.accumulate(x[:, ::-1], 1)[:, ::-1][:, 1:]
        gap = np.maximum((pmin - smax).min(0), (smin - pmax).min(0))  # per split point, over all samples
        k = int(np.argmax(gap))
        if not gap[k] >= need:
            return [(a, b)]
        return cut(a, a + k + 1) + cut(a + k + 1, b)

    return cut(0, n)


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


def weak_notes(ms: Iterable[Metrics], names: Sequence[str] | None = None) -> list[str]:
    """What a report says of the tensors (or parts) among ``ms`` decided by a weak sample
    (:meth:`Metrics.weak_worst`): one line per such sample."""
    groups: dict[tuple[int, float, float], list[str]] = {}
    for m in ms:
        if (weak := m.weak_worst()) is not None:
            groups.setdefault(weak, []).append(m.decided_by or m.name)
    out = []
    for (i, top, largest), judged in groups.items():
        who = names[i] if names is not None and i < len(names) else f"sample {i}"
        out.append(f"{' and '.join(judged)} {'is' if len(judged) == 1 else 'are'} decided by {who}, whose reference "
                   f"reaches only {top:.3g} where another sample reaches {largest:.3g}: a cosine there follows the noise "
                   "relative to a weak signal (a detector's scores on an input it detects nothing in); where such inputs "
                   "matter less, judge on inputs of the model's subject")
    return out
