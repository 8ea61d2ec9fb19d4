"""ConvRecord: the one per-convolution record that the analyzer fills and rules, reports and CLI share."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: Metadata key (``metadata_props`` of a rewritten model) of the rewrite engine's record: what replaced what.
REWRITES_KEY = "convgraph.rewrites"
#: Values of ConvRecord.kind.
KINDS = ("standard", "pointwise", "depthwise", "grouped", "pointwise_grouped", "transposed")
#: Values that may appear in ConvRecord.patterns.
PATTERNS = ("depthwise_separable", "spatially_separable", "channel_shuffle", "causal", "flattened")


@dataclass
class RewriteOption:
    """What one applicable rule would do to a conv, estimated without building it."""

    rule: str
    params: dict[str, Any]
    exact: bool
    macs_after: int | None
    params_after: int
    kind_after: str
    time_saved_ms: float | None = None  # profiled: an estimate, the conv's time_ms × (1 − macs_after / macs)
    saving: float | None = None  # 1 − macs_after / macs; where the MACs are formulas, at the reference size


@dataclass
class ConvRecord:
    """Everything convgraph knows about one convolution node.

    Shapes are tuples of ints, or None (or contain None) where a dim is unknown; a dim left dynamic is an
    :class:`~convgraph.model.expr.Expr` over the input symbols (a string in ``to_dict``). Spatial
    lists (kernel, strides, dilations, receptive_field, effective_stride) have one entry per spatial
    dim; ``pads`` is ONNX order (all begins, then all ends), resolved from auto_pad.
    """

    name: str  # the ONNX node name ("" if unnamed; node_id is always unique)
    node_id: str  # key of the node in its ConvGraph.graph
    op_type: str  # Conv, ConvTranspose, ConvInteger, QLinearConv, FusedConv, NhwcConv...
    domain: str
    graph: str  # "" for the main graph, else the subgraph's path
    kind: str  # one of KINDS
    spatial_dims: int
    quantized: bool
    dilated: bool
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    in_channels: int  # from the weight's shape, which a record needs (no record without it)
    out_channels: int
    depth_multiplier: int | None  # depthwise only: out_channels / in_channels
    input: str  # tensor names
    weight: str
    bias: str | None
    output: str
    input_shape: tuple | None
    output_shape: tuple | None
    macs: int | None  # without bias; see macs_bias
    macs_bias: int | None  # macs + one add per output element when there is a bias (onnx-tool's count)
    params: int  # weights + bias
    has_bias: bool
    weight_source: str  # initializer | Constant | ConstantOfShape | DequantizeLinear | input | unknown
    auto_pad: str = "NOTSET"
    bias_source: str | None = None  # as weight_source, for the bias (None: no bias, or not looked up)
    output_padding: tuple[int, ...] = ()
    receptive_field: tuple[int, ...] | None = None
    effective_stride: tuple[int, ...] | None = None
    checkerboard: bool = False  # transposed with a kernel not divisible by the stride
    fast_depthwise: bool | None = None  # depthwise: onnxruntime's fast CPU path can take it
    fast_depthwise_reason: str = ""
    macs_expr: Any = None  # macs (bias-free) as an int or an Expr over the input symbols; None when unknown
    macs_bias_expr: Any = None  # macs_bias likewise
    shape_source: str = "inferred"  # "measured" when its input or output shape came from running the model (--probe)
    patterns: list[str] = field(default_factory=list)
    rewrites: list[RewriteOption] = field(default_factory=list)
    # cost (convgraph.analysis.roofline): bytes each counted once, as stored (dtype-aware); None where a shape is unknown
    weight_bytes: int | None = None  # weights + bias
    activation_bytes: int | None = None  # input + output activations
    intensity: float | None = None  # arithmetic intensity: MACs per byte moved (weights + activations)
    bound: str | None = None  # "compute" or "memory": the roof its intensity meets on this machine's roofline
    # measured (convgraph.analysis.profile, analyze --profile); None unless profiled
    time_ms: float | None = None  # median per run of the kernels it became (fused activation, BN, Add included)
    time_share: float | None = None  # time_ms / the run composed of every kernel's median (Profile.kernels_ms)
    reorder_ms: float | None = None  # NCHWc layout reorders of its input and output, apart from time_ms
    gmacs: float | None = None  # achieved GMAC/s: macs / time_ms
    roofline_gap: float | None = None  # time_ms / the roofline's least time for it (1: on the roof)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples stay tuples, which JSON writes as lists); no deep copy of scalars."""
        d = _fields(self, _RECORD_FIELDS)
        for key in ("macs_expr", "macs_bias_expr"):  # JSON: a Python integer expression over the symbols
            if d[key] is not None:
                d[key] = str(d[key])
        for key in ("input_shape", "output_shape"):
            shape = d[key]
            if shape is not None and not all(type(x) is int for x in shape):
                d[key] = tuple(x if x is None or type(x) is int else str(x) for x in shape)
        d["patterns"] = list(self.patterns)
        d["rewrites"] = [{**_fields(o, _REWRITE_FIELDS), "params": dict(o.params)} for o in self.rewrites]
        return d


def _fields(obj, names: tuple[str, ...]) -> dict[str, Any]:
    """A dataclass's fields as a new dict, in order: one C-level copy of its ``__dict__`` (this runs for every
    conv of a big model); attributes set on it beyond its fields stay out."""
    d = dict(obj.__dict__)
    return d if len(d) == len(names) else {name: d[name] for name in names}


_RECORD_FIELDS = tuple(f.name for f in fields(ConvRecord))
_REWRITE_FIELDS = tuple(f.name for f in fields(RewriteOption))
