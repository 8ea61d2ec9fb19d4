"""Calibration statistics: the input patches each conv really sees, accumulated over a calibration set.

:func:`convgraph.engine.calibrate.calibrate` gathers them; the fits (:mod:`convgraph.fit`) read them. The model runs
once over the calibration inputs with the selected convs' input tensors exposed as extra
outputs, one batch at a time; each batch is folded into per-conv moments and dropped, so memory is the
statistics plus one batch of activations, never the whole set. For each conv and input channel ``c``
the patches ``x_c`` (``prod(kernel)`` values, extracted with the conv's own strides, pads and dilations)
give

* ``sum[c]`` = Σ x_c and ``sq[c]`` = Σ x_c x_cᵀ (the per-channel patch covariance, for whitened fits and
  bias correction), and, when ``(C_in/group)·prod(kernel)`` is at most ``full_max``,
* ``full[g]`` = Σ x_g x_gᵀ over the whole patch of a group (cross-channel terms, for least squares).

With a ``reference`` model (the original, when calibrating an already rewritten one) the same tensor of
the reference is read on the same inputs, and the cross moments Σ x_ref x_candᵀ are kept as well, so a
fit can target the original layer's output on the original activations while taking the rewritten
model's activations as its input (sequential fitting that corrects, rather than compounds, the errors of
the layers before). ``targets`` names a reference tensor per conv whose values at each output position
are correlated with the candidate conv's patches (Σ x yᵀ): the data for refitting a replacement's conv so
that it reproduces the original output directly (least squares on real activations).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..model.arithmetic import conv_pads, prod
from ..errors import ModelError, UsageError
from ..model.record import ConvRecord

#: Largest (C_in/group)·prod(kernel) whose full patch covariance is kept (2304 = 256 channels × 3×3).
FULL_MAX = 2304
#: Working memory for one chunk of patches (bytes, float64).
CHUNK_BYTES = 32 << 20
#: Whole-patch products (``full``, ``full_cross``, ``target_cross``: D² per position, D up to 2304) are
#: taken over at most this many output positions per image — a seeded random subset, scaled up to stand
#: for all positions — while the per-channel sums use every position. 4096 positions per image are still
#: hundreds of samples per dimension over a calibration set; a 160×160 map costs 6× less.
FULL_POSITIONS = 4096


def patches(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
            dilations: Sequence[int]) -> np.ndarray:
    """Read-only strided view ``(N, C, *out, *kernel)`` of the conv input ``x`` ``(N, C, *spatial)``.

    ``pads`` are ONNX order (all begins, then all ends); the padded copy is the only allocation.
    """
    nd = len(kernel)
    if x.ndim != nd + 2:
        raise ModelError(f"conv input has shape {x.shape}, expected {nd} spatial dims")
    width = [(0, 0), (0, 0)] + [(int(pads[i]), int(pads[i + nd])) for i in range(nd)]
    xp = np.pad(x, width) if any(any(w) for w in width) else x
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    if any(o <= 0 for o in out):
        raise ModelError(f"conv input {x.shape} is smaller than the kernel {tuple(kernel)}")
    shape = xp.shape[:2] + tuple(out) + tuple(kernel)
    st = xp.strides[:2] + tuple(xp.strides[2 + i] * strides[i] for i in range(nd)) + \
        tuple(xp.strides[2 + i] * dilations[i] for i in range(nd))
    return as_strided(xp, shape, st, writeable=False)


def _rows(view: np.ndarray, nd: int) -> Iterator[tuple[slice, int]]:
    """Chunks of the first output dim of a patch view so that one chunk stays under CHUNK_BYTES."""
    n, c = view.shape[:2]
    out, k = view.shape[2:2 + nd], view.shape[2 + nd:]
    per_row = n * c * prod(out[1:]) * prod(k) * 8
    step = max(1, CHUNK_BYTES // max(per_row, 1))
    for r in range(0, out[0], step):
        yield slice(r, min(out[0], r + step)), min(out[0], r + step) - r


def _by_channel(view: np.ndarray, nd: int) -> np.ndarray:
    """(N, C, *out, *k) → (C, M, K) float64 (a copy)."""
    c = view.shape[1]
    perm = (1, 0) + tuple(range(2, 2 + nd)) + tuple(range(2 + nd, 2 + 2 * nd))
    return np.ascontiguousarray(view.transpose(perm), dtype=np.float64).reshape(c, -1, prod(view.shape[2 + nd:]))


def _by_group(view: np.ndarray, pos: int, groups: int, nk: int | None = None) -> np.ndarray:
    """(N, C, *positions, *k) → (G, M, C/G·K) float32, the patch row of a group in (channel, tap) order
    (``pos`` position axes, ``nk`` kernel axes, by default as many).

    float32: the whole-patch products are the costly part (M·D² per batch) and a chunk's float32 sum is
    exact to ~1e-6 relative; the chunks are summed in float64.
    """
    nk = pos if nk is None else nk
    c = view.shape[1]
    k = prod(view.shape[2 + pos:])
    cg = c // groups
    perm = (0,) + tuple(range(2, 2 + pos)) + (1,) + tuple(range(2 + pos, 2 + pos + nk))
    x = np.ascontiguousarray(view.transpose(perm), dtype=np.float32).reshape(-1, groups, cg * k)
    return x.transpose(1, 0, 2)


def _position_subset(out: Sequence[int], cap: int, seed: int) -> tuple[tuple | None, float]:
    """At most ``cap`` of the output positions ``out`` (a seeded random subset, index arrays per axis,
    sorted) and what each stands for (positions / chosen); (None, 1.0) when there are no more than ``cap``."""
    total = prod(out)
    if total <= cap:
        return None, 1.0
    flat = np.sort(np.random.default_rng(seed).choice(total, size=cap, replace=False))
    return np.unravel_index(flat, tuple(out)), total / cap


def _column_sums(xc: np.ndarray) -> np.ndarray:
    """(C, M, K) → (C, K) sums over M, as a product with ones (BLAS: 3–4× numpy's strided reduction)."""
    return np.matmul(np.ones((1, xc.shape[1]), xc.dtype), xc)[:, 0]


def _scaled(a: np.ndarray, weight: float) -> np.ndarray:
    return a if weight == 1.0 else a * weight


@dataclass
class ConvStats:
    """Moments of one conv's input patches (float64 sums; divide by ``count`` for means)."""

    node_id: str
    input: str
    output: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple  # ONNX order; None entries resolved per batch from auto_pad
    dilations: tuple[int, ...]
    group: int
    channels: int
    sum: np.ndarray  # (C, K)
    sq: np.ndarray  # (C, K, K)
    auto_pad: str = "NOTSET"
    count: int = 0  # patches seen (per channel)
    full: np.ndarray | None = None  # (G, D, D), D = C/G·K
    ref_sum: np.ndarray | None = None  # (C, K): reference patches
    cross: np.ndarray | None = None  # (C, K, K): Σ x_ref x_candᵀ
    full_cross: np.ndarray | None = None  # (G, D, D)
    target: str | None = None  # reference tensor whose values are matched per output position
    target_sum: np.ndarray | None = None  # (O,)
    target_cross: np.ndarray | None = None  # (G, D, O/G): Σ x y_gᵀ
    activation: str | None = None  # the activation the conv's output feeds (see convgraph.fit.activation)
    act_sq: np.ndarray | None = None  # (O,): Σ (a σ'(t))² over output positions, the reference's t
    batches: int = 0
    holdout: "ConvStats | None" = None  # the same sums over every other batch only (see split)

    @classmethod
    def empty(cls, node_id: str, channels: int, kernel: Sequence[int], *, strides=None, pads=None, dilations=None,
              group: int = 1, auto_pad: str = "NOTSET", input: str = "", output: str = "",
              full_max: int = FULL_MAX, reference: bool = False, target: str | None = None,
              holdout: bool = False) -> "ConvStats":
        """Zeroed sums for a conv of ``channels`` inputs and ``kernel`` (defaults: stride 1, no pads);
        ``holdout`` keeps every other batch's sums apart as well, for validating fits (:meth:`split`)."""
        nd = len(kernel)
        if channels % group:
            raise ModelError(f"conv {node_id}: {channels} input channels do not split into {group} groups")
        k = prod(kernel)
        d = channels // group * k
        s = cls(node_id, input, output, tuple(int(v) for v in kernel), tuple(strides or (1,) * nd),
                tuple(pads if pads is not None else (0,) * (2 * nd)), tuple(dilations or (1,) * nd), int(group),
                int(channels), np.zeros((channels, k)), np.zeros((channels, k, k)), auto_pad, target=target)
        if len(s.strides) != nd or len(s.dilations) != nd or len(s.pads) != 2 * nd:
            raise ModelError(f"conv {node_id}: kernel, strides, pads and dilations disagree in rank")
        keep_full = d <= full_max or target is not None
        if keep_full:
            s.full = np.zeros((group, d, d))
        if reference:
            s.ref_sum, s.cross = np.zeros((channels, k)), np.zeros((channels, k, k))
            if keep_full:
                s.full_cross = np.zeros((group, d, d))
        if holdout:
            s.holdout = cls.empty(node_id, channels, kernel, strides=strides, pads=pads, dilations=dilations,
                                  group=group, auto_pad=auto_pad, input=input, output=output, full_max=full_max,
                                  reference=reference, target=target)
        return s

    @classmethod
    def for_record(cls, rec: ConvRecord, full_max: int = FULL_MAX, reference: bool = False,
                   target: str | None = None, holdout: bool = False) -> "ConvStats":
        """Zeroed sums for the conv of an analyzer record."""
        return cls.empty(rec.node_id, rec.in_channels, rec.kernel, strides=rec.strides, pads=rec.pads,
                         dilations=rec.dilations, group=rec.group, auto_pad=rec.auto_pad, input=rec.input,
                         output=rec.output, full_max=full_max, reference=reference, target=target,
                         holdout=holdout)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def taps(self) -> int:
        return prod(self.kernel)

    @property
    def mean(self) -> np.ndarray:
        """(C, K) mean patch of the (candidate) input."""
        return self.sum / max(self.count, 1)

    @property
    def ref_mean(self) -> np.ndarray:
        return (self.ref_sum if self.ref_sum is not None else self.sum) / max(self.count, 1)

    def cov(self) -> np.ndarray:
        """(C, K, K) centered per-channel patch covariance."""
        m = self.mean
        return self.sq / max(self.count, 1) - m[:, :, None] * m[:, None, :]

    def cross_cov(self) -> np.ndarray:
        """(C, K, K) centered E[x_ref x_candᵀ]; the covariance itself without a reference."""
        if self.cross is None:
            return self.cov()
        return self.cross / max(self.count, 1) - self.ref_mean[:, :, None] * self.mean[:, None, :]

    def _group_mean(self, mean: np.ndarray) -> np.ndarray:
        return mean.reshape(self.group, -1)

    def full_sums(self) -> np.ndarray:
        """(G, D, D) Σ x xᵀ of a group's whole patch; ModelError when it was not kept (patch over ``full_max``)."""
        if self.full is None:
            raise ModelError(f"conv {self.node_id}: no whole-patch statistics (its patch of "
                             f"{self.channels // self.group * self.taps} values was over the size kept)")
        return self.full

    def full_cov(self) -> np.ndarray:
        """(G, D, D) centered covariance of a group's whole patch (:meth:`full_sums` says when there is none)."""
        m = self._group_mean(self.mean)
        return self.full_sums() / max(self.count, 1) - m[:, :, None] * m[:, None, :]

    def full_cross_cov(self) -> np.ndarray:
        if self.full_cross is None:
            return self.full_cov()
        mr, m = self._group_mean(self.ref_mean), self._group_mean(self.mean)
        return self.full_cross / max(self.count, 1) - mr[:, :, None] * m[:, None, :]

    def target_cov(self) -> np.ndarray | None:
        """(G, D, O/G) centered E[x yᵀ] against the target tensor."""
        if self.target_cross is None or self.target_sum is None:
            return None
        m = self._group_mean(self.mean)
        ty = self.target_sum.reshape(self.group, -1) / max(self.count, 1)
        return self.target_cross / max(self.count, 1) - m[:, :, None] * ty[:, None, :]

    @property
    def target_mean(self) -> np.ndarray | None:
        return None if self.target_sum is None else self.target_sum / max(self.count, 1)

    # ---- accumulation -------------------------------------------------------------------------
    def _pads(self, spatial: Sequence[int]) -> tuple[int, ...]:
        if self.auto_pad in ("NOTSET", "") and all(p is not None for p in self.pads):
            return tuple(int(p) for p in self.pads)
        # the sizes are known, so no pad is None
        return tuple(int(p or 0) for p in conv_pads(spatial, self.kernel, self.strides, self.dilations,
                                                    [p or 0 for p in self.pads], self.auto_pad))

    def update(self, x: np.ndarray, ref: np.ndarray | None = None, target: np.ndarray | None = None,
               act_sq: np.ndarray | None = None) -> None:
        """Fold one batch of the conv's input (and the reference's, the target tensor, and the activation
        slope sums Σ (a σ'(t))² per output channel) into the sums."""
        nd = len(self.kernel)
        x = np.asarray(x)
        if x.ndim != nd + 2 or x.shape[1] != self.channels:
            raise ModelError(f"conv {self.node_id}: input batch of shape {x.shape} does not fit "
                             f"{self.channels} channels and {nd} spatial dims")
        pads = self._pads(x.shape[2:])
        view = patches(x, self.kernel, self.strides, pads, self.dilations)
        rview = None
        if self.cross is not None:
            if ref is None or ref.shape != x.shape:
                raise ModelError(f"conv {self.node_id}: reference input {None if ref is None else ref.shape} "
                                 f"does not match the candidate's {x.shape}")
            rview = patches(np.asarray(ref), self.kernel, self.strides, pads, self.dilations)
        if self.target is not None:
            if target is None or target.shape[0] != x.shape[0] or tuple(target.shape[2:]) != view.shape[2:2 + nd]:
                raise ModelError(f"conv {self.node_id}: target {self.target!r} of shape "
                                 f"{None if target is None else target.shape} does not match the output grid "
                                 f"{view.shape[2:2 + nd]}")
        accs = [self]
        if self.holdout is not None and self.batches % 2 == 1:
            accs.append(self.holdout)  # every other batch is also kept apart, for validating fits
        for rows, _ in _rows(view, nd):
            sl = (slice(None), slice(None), rows)
            xc = _by_channel(view[sl], nd)
            _add(accs, "sum", _column_sums(xc))
            _add(accs, "sq", np.matmul(xc.transpose(0, 2, 1), xc))
            if rview is not None:
                rc = _by_channel(rview[sl], nd)
                _add(accs, "ref_sum", _column_sums(rc))
                _add(accs, "cross", np.matmul(rc.transpose(0, 2, 1), xc))
            del xc
        if self.full is not None:
            y = None if self.target is None else np.asarray(target, dtype=np.float32)
            if y is not None:
                _add(accs, "target_sum", y.sum(axis=tuple(i for i in range(y.ndim) if i != 1), dtype=np.float64))
            out = view.shape[2:2 + nd]
            pick, scale = _position_subset(out, FULL_POSITIONS, self.batches)
            if pick is None:
                parts = [((slice(None), slice(None), rows), 1.0) for rows, _ in _rows(view, nd)]
            else:
                parts = [((slice(None), slice(None)) + pick, scale)]
            for sl, w in parts:
                self._add_full(accs, view[sl], None if rview is None else rview[sl],
                               None if y is None else y[sl], w)
        if act_sq is not None:
            _add(accs, "act_sq", np.asarray(act_sq, np.float64))
        n = prod(view.shape[2:2 + nd]) * x.shape[0]
        for a in accs:
            a.count += n
            a.batches += 1

    def _add_full(self, accs: list, v: np.ndarray, rv: np.ndarray | None, y: np.ndarray | None,
                  weight: float) -> None:
        """Whole-patch products of a patch view ``(N, C, *positions, *k)`` (``weight``: what one position
        stands for when a subset was taken)."""
        nd = len(self.kernel)
        pos = v.ndim - 2 - nd  # 1 for a subset (one flat axis of positions), nd for a run of rows
        xg = _by_group(v, pos, self.group, nd)
        _add(accs, "full", _scaled(np.matmul(xg.transpose(0, 2, 1), xg), weight))
        if rv is not None and self.full_cross is not None:
            rg = _by_group(rv, pos, self.group, nd)
            _add(accs, "full_cross", _scaled(np.matmul(rg.transpose(0, 2, 1), xg), weight))
        if y is not None:
            o = y.shape[1]
            yg = np.moveaxis(y, 1, -1).reshape(-1, self.group, o // self.group).transpose(1, 0, 2)
            _add(accs, "target_cross", _scaled(np.matmul(xg.transpose(0, 2, 1), yg), weight))

    def copy(self) -> "ConvStats":
        """A deep copy (arrays copied)."""
        c = replace(self, holdout=None if self.holdout is None else self.holdout.copy())
        for f in _ARRAYS:
            if getattr(self, f) is not None:
                setattr(c, f, getattr(self, f).copy())
        return c

    def split(self) -> "tuple[ConvStats, ConvStats] | None":
        """(fit part, held-out part) of these statistics, or None when no batch was held out."""
        h = self.holdout
        if h is None or h.count == 0 or h.count >= self.count:
            return None
        fit = replace(self, holdout=None)
        for f in _ARRAYS:
            a, b = getattr(self, f), getattr(h, f)
            setattr(fit, f, None if a is None else (a - b if b is not None else a.copy()))
        fit.count = self.count - h.count
        return fit, h

    def merge(self, other: "ConvStats") -> None:
        """Add another accumulation of the same conv (e.g. from another process) into this one."""
        if (other.node_id, other.kernel, other.channels) != (self.node_id, self.kernel, self.channels):
            raise UsageError(f"cannot merge statistics of {other.node_id} into {self.node_id}")
        for f in _ARRAYS:
            a, b = getattr(self, f), getattr(other, f)
            if a is not None and b is not None:
                setattr(self, f, a + b)
            elif b is not None:
                setattr(self, f, b.copy())
        self.count += other.count
        self.batches += other.batches
        if other.holdout is not None:
            if self.holdout is None:
                self.holdout = other.holdout.copy()
            else:
                self.holdout.merge(other.holdout)


def _add(accs: list, name: str, value: np.ndarray) -> None:
    for a in accs:
        cur = getattr(a, name)
        if cur is None:
            setattr(a, name, value.copy())
        else:
            cur += value


_ARRAYS = ("sum", "sq", "full", "ref_sum", "cross", "full_cross", "target_sum", "target_cross", "act_sq")
_META = ("node_id", "input", "output", "kernel", "strides", "pads", "dilations", "group", "channels", "auto_pad",
         "count", "target", "activation", "batches")


class Calibration(dict):
    """node_id → :class:`ConvStats`, plus how the statistics were gathered (``info``)."""

    def __init__(self, *args, info: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.info: dict[str, Any] = dict(info or {})

    def for_conv(self, rec: ConvRecord) -> ConvStats | None:
        """The statistics of ``rec``: by node id, else by its output tensor; None when none fit its geometry."""
        s = self.get(rec.node_id)
        if s is None or s.output != rec.output:
            s = next((v for v in self.values() if v.output == rec.output), None)
        if s is None or s.kernel != tuple(rec.kernel) or s.channels != rec.in_channels or s.group != rec.group:
            return None
        return s

    def save(self, path) -> None:
        """Write all statistics to one ``.npz`` (arrays) with the metadata as JSON inside it."""
        arrays: dict[str, np.ndarray] = {}
        meta = []
        for i, s in enumerate(self.values()):
            m = {f: getattr(s, f) for f in _META}
            for prefix, part in ((f"{i}.", s), (f"{i}.h.", s.holdout)):
                for f in _ARRAYS if part is not None else ():
                    if getattr(part, f) is not None:
                        arrays[prefix + f] = getattr(part, f)
            if s.holdout is not None:
                m["holdout"] = {"count": s.holdout.count, "batches": s.holdout.batches}
            meta.append(m)
        arrays["__meta__"] = np.frombuffer(json.dumps({"convs": meta, "info": self.info}).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        from ..io import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read statistics written by :meth:`save`; UsageError when the file is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                doc = json.loads(bytes(z["__meta__"]).decode())
                out = cls(info=doc.get("info"))
                for i, m in enumerate(doc["convs"]):
                    m = dict(m)
                    hold = m.pop("holdout", None)
                    for f in ("kernel", "strides", "pads", "dilations"):
                        m[f] = tuple(m[f])
                    s = ConvStats(**m, sum=z[f"{i}.sum"], sq=z[f"{i}.sq"])
                    if hold is not None:
                        s.holdout = ConvStats(**{**m, **hold, "sum": z[f"{i}.h.sum"], "sq": z[f"{i}.h.sq"]})
                    for prefix, part in ((f"{i}.", s), (f"{i}.h.", s.holdout)):
                        for f in _ARRAYS if part is not None else ():
                            if prefix + f in z:
                                setattr(part, f, z[prefix + f])
                    out[s.node_id] = s
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}: not a convgraph calibration file ({e})") from None
        return out
