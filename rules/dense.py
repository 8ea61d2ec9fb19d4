"""Rule ``dense``: a dilated Conv (or ConvTranspose) → the same conv with a dense, zero-filled kernel.

A kernel of size k with dilation d touches the same input positions as a dense kernel of size
d·(k−1)+1 holding the weights at every d-th tap and zeros between, so the rewrite is exact; pads,
strides, auto_pad, group (and output_padding/output_shape) stay as they are. For runtimes and
accelerators without dilation support: it costs d·(k−1)+1 / k times the MACs per dim.
"""

from __future__ import annotations

import numpy as np

from convgraph.model.arithmetic import effective_kernel
from convgraph.model.record import ConvRecord
from convgraph.rule import Replacement, Rule, RuleContext

from ._common import Names, attrs, kernel_estimate, label, plain_conv_reason, weights


#: The op types this rule rewrites.
OPS = ("Conv", "ConvTranspose")


def dense_kernel(rec: ConvRecord) -> tuple[int, ...]:
    return tuple(effective_kernel(k, d) for k, d in zip(rec.kernel, rec.dilations))


def match(rec: ConvRecord, ctx: RuleContext) -> str | None:
    why = plain_conv_reason(rec, ctx, OPS)
    if why:
        return why
    if not rec.dilated:
        return "not dilated"
    return None


def zero_fill(w: np.ndarray, dilations: tuple[int, ...]) -> np.ndarray:
    """``w`` (*, *, *k) with d−1 zeros inserted between the taps of each spatial dim."""
    nd = len(dilations)
    kernel = w.shape[2:]
    out = np.zeros(w.shape[:2] + tuple(effective_kernel(k, d) for k, d in zip(kernel, dilations)), w.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations[:nd])] = w
    return out


def build(rec: ConvRecord, ctx: RuleContext, params: dict) -> Replacement:
    wt = weights(rec, ctx)
    names = Names(ctx, label(rec))
    w_init = names.init("dense_W", wt.cast(zero_fill(wt.w, rec.dilations)))
    node = ctx.node(rec.node_id)
    new_attrs = {k: v for k, v in attrs(ctx, rec.node_id).items() if k != "dilations"}
    new_attrs["kernel_shape"] = list(dense_kernel(rec))
    inputs = list(node.input)
    inputs[1] = w_init.name
    new = names.node(rec.op_type, inputs, list(node.output), "dense", **new_attrs)
    macs, n_params, kind = estimate(rec, params)
    return Replacement([new], [w_init], True, kind, macs, n_params, weight_error=0.0, notes=wt.notes)


def estimate(rec: ConvRecord, params: dict) -> tuple[int | None, int, str]:
    return kernel_estimate(rec, dense_kernel(rec))


RULE = Rule(
    name="dense",
    summary="dilated conv → dense conv with zeros inserted in the kernel (exact; for runtimes without dilation)",
    exact=True,
    params=(),
    match=match,
    build=build,
    estimate=estimate,
    op_types=OPS,
)
