"""The activation a conv feeds, and the output-channel weights of a fit to its post-activation response.

A conv's output y often reaches the rest of the model only through a pointwise activation z = σ(t) of
t = a·y + c (a, c per output channel: a BatchNormalization, Mul/Div/Add/Sub by constants in between).
To first order σ(t + a δ) − σ(t) ≈ a σ'(t) δ, so the post-activation error of a replacement y' = y + δ is
E‖a σ'(t) δ‖²: the pre-activation error with each output channel o weighted by d_o = E[(a_o σ'(t_o))²]
(exactly, where σ' and δ are uncorrelated). Channels the activation mostly flattens (a ReLU that is
rarely on, a saturated Sigmoid) count less. The weights are measured on calibration data
(:mod:`convgraph.engine.calibrate` keeps Σ (a σ'(t))² per channel); every factorization the fits make (low rank,
separable, spatially separable) is closed under scaling output rows, so the weighted fit is the plain
fit of D^{1/2}W, its output factor scaled back by D^{−1/2} (:func:`scaled_rows`).

Detected (:func:`activation_of`): the conv's only reader, through per-channel affine ops, is Relu,
LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Clip with constant bounds, or t·f(t) built of ops: SiLU as
Mul(t, Sigmoid(t)), Mul(t, HardSigmoid(t)), Mul(t, Clip(t + c, lo, hi)) (HardSwish as PaddlePaddle exports
it; a scalar Div/Mul after it only scales every channel alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.weights import constant_value

#: Per-channel affine ops allowed between a conv and its activation (with a constant other operand).
AFFINE = frozenset({"BatchNormalization", "Mul", "Div", "Add", "Sub"})
#: Most affine ops followed from a conv to its activation.
AFFINE_MAX = 4
#: A channel's weight is at least this share of the mean weight (a channel the calibration data never
#: turned on may on other data; and its rows must stay invertible when scaled back).
WEIGHT_FLOOR = 0.01


@dataclass(frozen=True)
class Activation:
    """z = σ(t), t = scale·y + c: ``kind`` and ``params`` name σ, ``tensor`` is t, ``nodes`` the ops from the
    conv output to z (affine ones included), ``output`` z."""

    kind: str  # relu | leakyrelu | sigmoid | hardsigmoid | clip | silu | xhardsigmoid | xclip
    params: tuple[float, ...]
    tensor: str
    output: str
    nodes: tuple[str, ...]
    scale: np.ndarray  # (O,) the affine ops' slope per output channel

    def slope(self, t: np.ndarray) -> np.ndarray:
        """σ'(t), elementwise (float32 for float32 input)."""
        p = self.params
        if self.kind == "relu":
            return (t > 0).astype(t.dtype)
        if self.kind == "leakyrelu":
            return np.where(t > 0, 1.0, p[0]).astype(t.dtype)
        if self.kind in ("sigmoid", "silu"):
            s = 1.0 / (1.0 + np.exp(-np.clip(t, -60, 60)))
            return s * (1 - s) if self.kind == "sigmoid" else s * (1 + t * (1 - s))
        if self.kind in ("hardsigmoid", "xhardsigmoid"):
            u = p[0] * t + p[1]
            inside = ((u > 0) & (u < 1)).astype(t.dtype)
            return p[0] * inside if self.kind == "hardsigmoid" else np.clip(u, 0, 1) + t * p[0] * inside
        if self.kind == "clip":
            return ((t > p[0]) & (t < p[1])).astype(t.dtype)
        if self.kind == "xclip":
            u = t + p[0]
            return np.clip(u, p[1], p[2]) + t * ((u > p[1]) & (u < p[2]))
        raise ValueError(f"unknown activation {self.kind!r}")

    def weight_sums(self, t: np.ndarray) -> np.ndarray:
        """Σ (scale·σ'(t))² per channel (axis 1) over a batch of t (N, O, *spatial), float64."""
        s = self.slope(np.asarray(t, np.float32))
        s = np.moveaxis(s, 1, -1).reshape(-1, s.shape[1])
        return np.einsum("mo,mo->o", s, s, dtype=np.float64) * self.scale.astype(np.float64) ** 2

    @property
    def describe(self) -> str:
        return self.kind + (f"({', '.join(f'{v:g}' for v in self.params)})" if self.params else "")


def row_weights(stats) -> np.ndarray | None:
    """Per-output-channel weights d_o = E[(a σ'(t))²] of calibration statistics (normalized to mean 1,
    floored at :data:`WEIGHT_FLOOR`), or None when the conv feeds no detected activation."""
    s = getattr(stats, "act_sq", None)
    if s is None or not np.any(s > 0):
        return None
    d = s / np.mean(s)
    return np.maximum(d, WEIGHT_FLOOR)


def scaled_rows(w: np.ndarray, bias: np.ndarray | None, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D^{1/2} W, D^{1/2} b) for output weights ``rows`` (O,): the weighted problem as a plain one."""
    sd = np.sqrt(rows)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return w * sd.reshape((-1,) + (1,) * (w.ndim - 1)), b * sd


# ---- detection --------------------------------------------------------------------------------------
def activation_of(cg, conv_id: str) -> Activation | None:
    """The activation conv ``conv_id`` feeds alone (see the module doc), else None."""
    node = cg.node(conv_id)
    w = constant_value(cg, node.input[1]) if len(node.input) > 1 else None
    if w is None or not node.output or not node.output[0]:
        return None
    o = w.shape[0]
    t, scale, chain = node.output[0], np.ones(o), list[str]()
    for _ in range(AFFINE_MAX + 1):
        readers = cg.consumers(t)
        if not readers or any(cg.graph.nodes[v]["kind"] != "op" for v in readers):
            return None  # a graph output (or nothing) reads the pre-activation tensor
        if len(readers) == 2:
            return _times_gate(cg, t, readers, scale, chain)
        if len(readers) != 1:
            return None
        v = readers[0]
        n = cg.node(v)
        if n.op_type in AFFINE:
            s = _affine_slope(cg, v, t, o, len(w.shape) - 2)
            if s is None:
                return None
            scale, t = scale * s, n.output[0]
            chain.append(v)
            continue
        found = _single(cg, v, n)
        if found is None:
            return None
        kind, params = found
        return Activation(kind, params, t, n.output[0], tuple(chain + [v]), scale)
    return None


def _attr(cg, v: str, name: str, default):
    return cg.graph.nodes[v]["attrs"].get(name, default)


def _single(cg, v: str, n) -> tuple[str, tuple[float, ...]] | None:
    """(kind, params) of a one-op activation."""
    op = n.op_type
    if op in ("Relu", "Sigmoid"):
        return op.lower(), ()
    if op == "LeakyRelu":
        return "leakyrelu", (float(_attr(cg, v, "alpha", 0.01)),)
    if op == "HardSigmoid":
        return "hardsigmoid", _hardsigmoid(cg, v)
    if op == "HardSwish":
        return "xhardsigmoid", (1 / 6, 0.5)
    if op == "Clip":
        bounds = _clip_bounds(cg, v, n)
        return None if bounds is None else ("clip", bounds)
    return None


def _hardsigmoid(cg, v: str) -> tuple[float, float]:
    return float(_attr(cg, v, "alpha", 0.2)), float(_attr(cg, v, "beta", 0.5))


def _clip_bounds(cg, v: str, n) -> tuple[float, float] | None:
    lo, hi = float(_attr(cg, v, "min", -np.inf)), float(_attr(cg, v, "max", np.inf))
    for i, name in ((1, "lo"), (2, "hi")):
        if len(n.input) > i and n.input[i]:
            c = constant_value(cg, n.input[i])
            if c is None or c.size != 1:
                return None
            lo, hi = (float(c), hi) if name == "lo" else (lo, float(c))
    return lo, hi


def _times_gate(cg, t: str, readers: list[str], scale, chain) -> Activation | None:
    """t·f(t): a Mul of t and f(t), f Sigmoid, HardSigmoid or Clip(t + c) — the two readers of t."""
    nodes = {v: cg.node(v) for v in readers}
    mul = next((v for v in readers if nodes[v].op_type == "Mul"), None)
    gate = next((v for v in readers if v != mul), None)
    if mul is None or gate is None:
        return None
    g = nodes[gate]
    inner = [gate]
    params: tuple[float, ...] = ()
    if g.op_type == "Sigmoid":
        kind = "silu"
    elif g.op_type == "HardSigmoid":
        kind, params = "xhardsigmoid", _hardsigmoid(cg, gate)
    elif g.op_type == "Add":
        c = _other_constant(cg, g, t)
        nxt = cg.consumers(g.output[0])
        if c is None or c.size != 1 or len(nxt) != 1 or cg.graph.nodes[nxt[0]]["kind"] != "op":
            return None
        clip = cg.node(nxt[0])
        bounds = _clip_bounds(cg, nxt[0], clip) if clip.op_type == "Clip" else None
        if bounds is None:
            return None
        kind, params = "xclip", (float(c), *bounds)
        inner.append(nxt[0])
        g = clip
    else:
        return None
    if cg.consumers(g.output[0]) != [mul] or sorted(nodes[mul].input) != sorted([t, g.output[0]]):
        return None
    return Activation(kind, params, t, nodes[mul].output[0], tuple(chain + inner + [mul]), scale)


def _other_constant(cg, n, t: str) -> np.ndarray | None:
    others = [i for i in n.input if i != t]
    if len(others) != 1 or len(n.input) != 2:
        return None
    return constant_value(cg, others[0])


def _affine_slope(cg, v: str, t: str, o: int, nd: int) -> np.ndarray | float | None:
    """The per-channel slope of affine op ``v`` on t, or None when it is not one (a non-constant operand,
    or a constant that varies along the spatial axes)."""
    n = cg.node(v)
    op = n.op_type
    if op == "BatchNormalization":
        if n.input[0] != t or len(n.input) < 5 or len([x for x in n.output if x]) != 1:
            return None
        gamma, var = constant_value(cg, n.input[1]), constant_value(cg, n.input[4])
        if gamma is None or var is None or gamma.size != o or var.size != o:
            return None
        eps = float(_attr(cg, v, "epsilon", 1e-5))
        return gamma.astype(np.float64).reshape(-1) / np.sqrt(var.astype(np.float64).reshape(-1) + eps)
    c = _other_constant(cg, n, t)
    if c is None:
        return None
    c = np.asarray(c, np.float64)
    if c.ndim > nd + 2:
        return None
    shape = (1,) * (nd + 2 - c.ndim) + tuple(c.shape)
    if shape[0] != 1 or any(n != 1 for n in shape[2:]) or shape[1] not in (1, o):
        return None
    c = np.broadcast_to(c.reshape(-1), (o,))
    if op in ("Add", "Sub"):
        return -1.0 if op == "Sub" and n.input[1] == t else 1.0
    if op == "Mul":
        return c
    if n.input[0] != t or not np.all(c != 0):  # k / t is not affine
        return None
    return 1.0 / c
