"""The analyzer: one :class:`~convgraph.model.record.ConvRecord` per convolution, over the main graph and every subgraph.

``analyze(convgraph.load(path))`` classifies each conv (kind, quantized, dilated), computes its
arithmetic (resolved pads, output shape, MACs, params), its receptive field relative to the model
input, the blocks it belongs to (patterns), whether onnxruntime's fast depthwise path takes it, and
what each applicable rewrite rule would save.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import onnx

from ..model import arithmetic as ar
from ..model.convops import ConvOp, classify, conv_op
from ..errors import ModelError
from ..model.graph import ConvGraph, gc_paused
from ..model.shapes import real_inputs
from ..model.record import KINDS, ConvRecord, RewriteOption
from .roofline import memory_cost
from ..model.weights import constant_shape, constant_source, elem_type


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def checkerboard(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> bool:
    """Uneven overlap of a transposed conv: the output phases do not all receive the same number of taps."""
    for k, s, d in zip(kernel, strides, dilations):
        if s > 1:
            counts = Counter((t * d) % s for t in range(k))
            if len(counts) < s or len(set(counts.values())) > 1:
                return True
    return False


def _dims(shape) -> tuple | None:
    """A shape as a tuple; the names onnx gives dims it cannot infer (unk__0, unk__1...) become None."""
    if shape is None:
        return None
    if all(type(d) is int for d in shape):
        return tuple(shape)
    return tuple(None if isinstance(d, str) and d.startswith("unk__") else d for d in shape)


def _merge_shape(computed: tuple | None, inferred: tuple | None) -> tuple | None:
    """Per dim: a computed int, else what shape inference said (int or symbolic name), else None."""
    inferred = _dims(inferred)
    if computed is None:
        return inferred
    if inferred is None or len(inferred) != len(computed):
        return computed
    if all(type(c) is int for c in computed):
        return computed
    return tuple(c if ar.known(c) else i for c, i in zip(computed, inferred))


def _check_geometry(nid: str, path: str, kernel, strides, dilations, group: int, pads, auto_pad: str) -> None:
    """ModelError (one line) for attributes no runtime accepts, before any arithmetic divides by them."""
    where = f"conv {nid!r}" + (f" in {path}" if path else "")
    nd = len(kernel)
    if len(strides) != nd or len(dilations) != nd or (pads and len(pads) != 2 * nd):
        raise ModelError(f"{where}: kernel {list(kernel)}, strides {list(strides)}, dilations {list(dilations)} and "
                         f"pads {list(pads)} disagree on the number of spatial dims")
    if min(kernel) < 1 or min(strides) < 1 or min(dilations) < 1 or group < 1 or (pads and min(pads) < 0):
        raise ModelError(f"{where}: kernel, strides, dilations and group must be positive, pads non-negative "
                         f"(kernel {list(kernel)}, strides {list(strides)}, dilations {list(dilations)}, "
                         f"group {group})")
    if auto_pad not in ar.AUTO_PADS:
        raise ModelError(f"{where}: unknown auto_pad {auto_pad!r}")


def conv_record(cg: ConvGraph, nid: str) -> ConvRecord | None:
    """The record of conv node ``nid`` of ``cg`` (None if it is not a conv or its weight shape is unknown)."""
    data = cg.graph.nodes[nid]
    spec = conv_op(data)
    return None if spec is None else _record(cg, nid, data, spec)


def _record(cg: ConvGraph, nid: str, data: dict, spec: ConvOp) -> ConvRecord | None:
    node, attrs = data["proto"], data["attrs"]
    inputs = list(node.input)  # one read of the proto's repeated field
    x = inputs[0] if inputs else ""
    w = inputs[spec.weight] if len(inputs) > spec.weight else ""
    b = inputs[spec.bias] if spec.bias is not None and len(inputs) > spec.bias and inputs[spec.bias] else None
    wshape = constant_shape(cg, w) if w else None
    if wshape is None and w:
        inferred = cg.shape(w)
        wshape = tuple(inferred) if inferred is not None and all(ar.known(d) for d in inferred) else None
    kernel = attrs.get("kernel_shape")
    kernel = tuple(map(int, kernel)) if kernel else (tuple(wshape[2:]) if wshape else ())
    if wshape is None or len(wshape) < 3 or not kernel:
        return None
    if len(wshape) == len(kernel) + 2 and tuple(wshape[2:]) != kernel:  # no runtime accepts it; rules would trust it
        raise ModelError(f"conv {nid!r}" + (f" in {cg.path}" if cg.path else "") + f": kernel_shape {list(kernel)} "
                         f"disagrees with its weight's shape {list(wshape)}")
    nd = len(kernel)
    strides = tuple(map(int, attrs.get("strides", ()))) or (1,) * nd
    dilations = tuple(map(int, attrs.get("dilations", ()))) or (1,) * nd
    group = int(attrs.get("group", 1))
    auto_pad = _str(attrs.get("auto_pad", "NOTSET")) or "NOTSET"
    given_pads = attrs.get("pads", ())
    _check_geometry(nid, cg.path, kernel, strides, dilations, group, given_pads, auto_pad)
    channels_last = spec.channels_last or bool(attrs.get("channels_last", 0))
    if spec.transposed:
        in_channels, out_channels = int(wshape[0]), int(wshape[1]) * group
    else:
        in_channels, out_channels = int(wshape[1]) * group, int(wshape[0])

    in_shape = _dims(cg.shape(x)) if x else None
    if in_shape is not None and len(in_shape) == nd + 2:
        in_spatial = in_shape[1:-1] if channels_last else in_shape[2:]
        batch = in_shape[0]
    else:
        in_spatial, batch = (None,) * nd, None
    output_padding = tuple(map(int, attrs.get("output_padding", ())))
    if spec.transposed:
        pads, out_spatial = ar.conv_transpose_geometry(
            in_spatial, kernel, strides, dilations, given_pads, auto_pad, output_padding,
            attrs.get("output_shape", ()))
    else:
        pads = ar.conv_pads(in_spatial, kernel, strides, dilations, given_pads, auto_pad)
        out_spatial = ar.conv_output_spatial(in_spatial, kernel, strides, dilations, given_pads, auto_pad)
    computed = (batch, *out_spatial, out_channels) if channels_last else (batch, out_channels, *out_spatial)
    out_name = node.output[0] if node.output else ""
    output_shape = _merge_shape(computed, cg.shape(out_name) if out_name else None)

    # MACs as an int, or an Expr over the input symbols (dims left dynamic)
    if spec.transposed:
        n, per = ar.elements(in_shape), out_channels // group * ar.prod(kernel)
    else:
        n, per = ar.elements(output_shape), in_channels // group * ar.prod(kernel)
    macs_expr = None if n is None else n * per
    has_bias = b is not None
    adds = ar.elements(output_shape) if has_bias else 0
    bias_expr = None if macs_expr is None or adds is None else macs_expr + adds
    macs = macs_expr if type(macs_expr) is int else None
    macs_bias = bias_expr if type(bias_expr) is int else None
    params = ar.prod(wshape)
    if b is not None:
        bias_shape = constant_shape(cg, b)
        params += ar.prod(bias_shape) if bias_shape is not None else out_channels
    source = constant_source(cg, w) if w else "unknown"
    kind = classify(spec.transposed, kernel, group, in_channels)
    return ConvRecord(
        name=node.name, node_id=nid, op_type=node.op_type, domain=node.domain, graph=cg.path, kind=kind,
        spatial_dims=nd, quantized=spec.quantized or source == "DequantizeLinear",
        dilated=any(d > 1 and k > 1 for d, k in zip(dilations, kernel)),
        kernel=kernel, strides=strides, pads=tuple(pads), dilations=dilations, group=group,
        in_channels=in_channels, out_channels=out_channels,
        depth_multiplier=out_channels // in_channels if kind == "depthwise" else None,
        input=x, weight=w, bias=b, output=out_name, input_shape=in_shape, output_shape=output_shape,
        macs=macs, macs_bias=macs_bias, params=params, macs_expr=macs_expr, macs_bias_expr=bias_expr, has_bias=has_bias,
        weight_source=source,
        bias_source=constant_source(cg, b) if b is not None else None,
        auto_pad=auto_pad, output_padding=output_padding,
        checkerboard=spec.transposed and checkerboard(kernel, strides, dilations),
        shape_source="measured" if (x and cg.shape_measured(x)) or (out_name and cg.shape_measured(out_name))
        else "inferred",
    )


# ---- onnxruntime's fast depthwise path ------------------------------------------------------------
def host_simd_block() -> int:
    """onnxruntime's NCHWc block size on this CPU: 16 with AVX-512F, 8 with AVX2, else 0 (no NCHWc path)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return 0


#: onnxruntime's NCHWc transform takes a depthwise conv whose channels are a multiple of this (then pads them
#: up to the SIMD block); measured on onnxruntime 1.32 (tests/test_analyze.py checks it against onnxruntime).
NCHWC_CHANNEL_ALIGNMENT = 4


def fast_depthwise(r: ConvRecord, simd_block: int, cg: ConvGraph | None = None) -> tuple[bool, str]:
    """Whether onnxruntime's NCHWc depthwise kernel takes a depthwise conv, and why (not).

    onnxruntime's NchwcTransformer (CPU, graph optimization level ALL) rewrites a Conv when it is 2D
    with static fp32 weights and bias, one input channel per group, C_out = group (multiplier 1) and
    C_out a multiple of 4 (:data:`NCHWC_CHANNEL_ALIGNMENT`; the channels are padded up to the SIMD block,
    8 on AVX2, 16 on AVX-512: measured on onnxruntime 1.32, 3–96 channels); otherwise a depthwise conv runs
    as one small GEMM per channel (onnxruntime issue #9192). ``cg`` (the conv's graph) adds the dtype checks.
    """
    why = []
    if r.op_type not in ("Conv", "FusedConv"):
        why.append(f"{r.op_type} has no NCHWc kernel")
    if r.spatial_dims != 2:
        why.append(f"{r.spatial_dims}D (NCHWc is 2D only)")
    if r.weight_source not in ("initializer", "Constant"):
        why.append(f"weight is not a static constant ({r.weight_source})")
    elif r.quantized:
        why.append("quantized weights (NCHWc is fp32)")
    if cg is not None:
        for what, tensor in (("weight", r.weight), ("bias", r.bias)):
            t = elem_type(cg, tensor) if tensor else None
            if t is not None and t != onnx.TensorProto.FLOAT:
                why.append(f"{what} is {onnx.TensorProto.DataType.Name(t).lower()}, not float32")
        if r.bias and (r.bias_source or constant_source(cg, r.bias)) not in ("initializer", "Constant"):
            why.append("bias is not a static constant")
    if r.depth_multiplier != 1:
        why.append(f"depth multiplier {r.depth_multiplier} (needs 1)")
    if simd_block <= 1:
        why.append("this CPU has no NCHWc path (needs AVX2 or AVX-512)")
    elif r.out_channels is not None and r.out_channels % NCHWC_CHANNEL_ALIGNMENT:
        why.append(f"{r.out_channels} channels, not a multiple of {NCHWC_CHANNEL_ALIGNMENT}")
    if why:
        return False, "slow per-channel GEMM path: " + "; ".join(why)
    padded = "" if r.out_channels is None or not r.out_channels % simd_block else \
        f", padded to {-(-r.out_channels // simd_block) * simd_block}"
    return True, f"NCHWc depthwise kernel ({r.out_channels} channels{padded}, SIMD block {simd_block})"


# ---- the analysis ---------------------------------------------------------------------------------
@dataclass
class Analysis:
    """The result of :func:`analyze`: records in model order, totals, warnings, model and input info."""

    convs: list[ConvRecord]
    totals: dict[str, Any]
    warnings: list[str]
    model: dict[str, Any]
    inputs: list[dict[str, Any]]
    graphs: dict[str, ConvGraph] = field(default_factory=dict, repr=False)  # subgraph path → ConvGraph
    roofline: Any = None  # the convgraph.analysis.roofline.Roofline that set each record's bound, if any
    profile: Any = None  # the convgraph.analysis.profile.Profile whose times the records carry, if profiled
    symbols: dict[str, dict] = field(default_factory=dict)  # identifier → {"input", "axis"} of each dynamic dim

    def by_id(self, graph: str = "") -> dict[str, ConvRecord]:
        """node_id → record for the convs of one graph (the main graph by default)."""
        return {r.node_id: r for r in self.convs if r.graph == graph}

    def record(self, node_id: str, graph: str = "") -> ConvRecord:
        """The record of conv ``node_id`` in ``graph``; KeyError if there is none."""
        for r in self.convs:
            if r.node_id == node_id and r.graph == graph:
                return r
        raise KeyError(f"no conv {node_id!r} in graph {graph or 'main'!r}")

    def __iter__(self) -> Iterator[ConvRecord]:
        return iter(self.convs)

    def __len__(self) -> int:
        return len(self.convs)

    def to_dict(self, convs: "list[ConvRecord] | None" = None) -> dict[str, Any]:
        """``{"model", "inputs", "symbols", "convs", "totals"}``, JSON-ready (warnings are not part of it).

        ``convs``: the records to list (e.g. sorted, or the top N); default all. Totals stay whole.
        """
        d = {"model": self.model, "inputs": self.inputs, "symbols": self.symbols,
             "convs": [r.to_dict() for r in (self.convs if convs is None else convs)], "totals": self.totals}
        for key in ("roofline", "profile"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key).to_dict()
        return d


def _sum(values: list) -> Any:
    return None if any(v is None for v in values) else sum(values)


def totals(records: list[ConvRecord], skipped: "set[str] | frozenset" = frozenset()) -> dict[str, Any]:
    """Count, MACs (None when any is unknown), MACs with bias and params: overall and per kind.

    ``macs_expr`` / ``macs_bias_expr``: the MACs as a Python integer expression over the input symbols
    (the number's text when every shape is known). ``skipped``: graph paths of If branches not taken,
    whose convs are listed but not counted.
    """

    def block(rs: list[ConvRecord]) -> dict[str, Any]:
        counted = [r for r in rs if r.graph not in skipped]
        macs, bias = _sum([r.macs_expr for r in counted]), _sum([r.macs_bias_expr for r in counted])
        return {"convs": len(rs), "macs": macs if type(macs) is int else None,
                "macs_bias": bias if type(bias) is int else None,
                "macs_expr": None if macs is None else str(macs), "macs_bias_expr": None if bias is None else str(bias),
                "params": sum(r.params for r in rs), "macs_unknown": sum(r.macs_expr is None for r in counted)}


    out = block(records)
    out["by_kind"] = {k: block([r for r in records if r.kind == k]) for k in KINDS if any(r.kind == k for r in records)}
    return out


def _model_info(cg: ConvGraph) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    m = cg.model
    info = {
        "graph": m.graph.name, "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "ir_version": m.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "nodes": sum(len(g.topological_order()) for g in cg.walk()),
    }
    inputs = []
    for vi in real_inputs(m.graph):
        shape = cg.shape(vi.name)
        info_t = cg.shapes.get(vi.name)
        inputs.append({"name": vi.name, "shape": [d if d is None or type(d) is int else str(d) for d in shape]
                       if shape is not None else None,
                       "elem_type": info_t.elem_type if info_t else None,
                       "fixed": vi.name in getattr(cg, "input_shapes", {})})
    return info, inputs


def analyze(cg: ConvGraph, *, rewrites: bool = True, simd_block: int | None = None) -> Analysis:
    """Analyze every convolution of ``cg`` (main graph and subgraphs), in model order.

    ``rewrites``: estimate each applicable rule of :func:`convgraph.registry.all_rules`.
    ``simd_block``: onnxruntime's NCHWc block size for the fast-depthwise check (default: this CPU's).
    """
    with gc_paused():
        return _analyze(cg, rewrites, host_simd_block() if simd_block is None else simd_block)


def _analyze(cg: ConvGraph, rewrites: bool, block: int) -> Analysis:
    from .patterns import detect_patterns
    from .receptive import receptive_fields

    records: list[ConvRecord] = []
    graphs: dict[str, ConvGraph] = {}
    warnings = list(cg.warnings)
    rf_maps: dict[str, dict] = {}
    for g in cg.walk():
        graphs[g.path] = g
        order = g.topological_order()
        rf = receptive_fields(g, rf_maps.get(g.parent.path) if g.parent is not None else None, order)
        rf_maps[g.path] = rf
        graph_records = []
        nodes = g.graph._node  # networkx's node dict: a plain lookup per op
        for nid in order:
            data = nodes[nid]
            spec = conv_op(data)
            if spec is None:
                continue
            r = _record(g, nid, data, spec)
            if r is None:
                warnings.append(f"conv {nid!r}{' in ' + g.path if g.path else ''}: weight shape unknown; skipped")
                continue
            r.receptive_field, r.effective_stride = _rf_of(rf.get(r.output), r.spatial_dims)
            if r.kind == "depthwise":
                r.fast_depthwise, r.fast_depthwise_reason = fast_depthwise(r, block, g)
            memory_cost(g, r)
            graph_records.append(r)
        detect_patterns(g, graph_records, order)
        if rewrites:
            _add_rewrites(g, graph_records)
        records.extend(graph_records)
    unknown = _unknown_shapes_warning(cg, records)
    if unknown:
        warnings.append(unknown)
    model, inputs = _model_info(cg)
    branches: dict[str, str] = {}
    for g in cg.walk():
        outer = branches.get(g.parent.path) if g.parent is not None else None
        if g.taken is not None or outer == "not taken":
            branches[g.path] = "not taken" if g.taken is False or outer == "not taken" else "taken"
    skipped = {p for p, b in branches.items() if b == "not taken"}
    model["branches"] = branches  # If bodies: "taken" / "not taken" where the condition is known
    return Analysis(records, totals(records, skipped), warnings, model, inputs, graphs, symbols=dict(cg.symbols))


def _unknown_shapes_warning(cg: ConvGraph, records: list[ConvRecord]) -> str | None:
    """The convs whose MACs are unknown although every input shape is: onnx's inference lost their shapes.

    (With dynamic inputs left unset, the loader's warning already says why and what to do.)
    """
    lost = [r for r in records if r.macs_expr is None]
    if not lost or any(not (i := cg.shape_info(vi.name)) or not i.static for vi in real_inputs(cg.model.graph)):
        return None
    main = [r for r in lost if not r.graph]
    body = [r for r in lost if r.graph]

    def listed(recs: list[ConvRecord]) -> str:
        return ", ".join(r.name or r.node_id for r in recs[:5]) + (f" and {len(recs) - 5} more" if len(recs) > 5 else "")

    parts = [f"{len(lost)} conv{'s' * (len(lost) != 1)} with unknown shapes, so unknown MACs (onnx's shape inference "
             f"could not follow the graph to them)"]
    if main:
        parts.append(f"{listed(main)}" + (" in the main graph" if body else ""))
    if body:  # only running the model could tell, and onnxruntime exposes only main-graph tensors
        parts.append(f"{listed(body)} in If/Loop/Scan bodies" + (
            ", which running the model (--probe) could not measure: onnxruntime exposes only main-graph tensors"
            if cg.measured else ""))
    text = parts[0] + ": " + "; ".join(parts[1:])
    if main and not cg.measured:
        text += ("; --probe (convgraph.load(..., probe=True)) runs the model once on generated inputs to measure "
                 + ("those of the main graph (onnxruntime exposes only main-graph tensors)" if body else "them"))
    return text


def _rf_of(entry, nd: int) -> tuple[tuple | None, tuple | None]:
    if entry is None or len(entry) != nd:
        return None, None
    rf = tuple(int(-(-r // 1)) for r, _ in entry)
    stride = tuple(int(j) if j.denominator == 1 else float(j) for _, j in entry)
    return rf, stride


def _add_rewrites(g: ConvGraph, records: list[ConvRecord]) -> None:
    from ..model.reference import at_reference, reference_values
    from ..registry import all_rules
    from ..rule import RuleContext

    # each rule's default params, exactness and whether it may refuse to add MACs, once: the estimate is for the
    # defaults; a rule whose ops a conv is not gets no question (``Rule.op_types``)
    rules = []
    for rule in all_rules().values():
        if rule.estimate is not None and not rule.quantizes:  # the analyzer offers MAC savings; int8 saves none
            params = rule.resolve_params({})
            exact = rule.is_exact(params)
            rules.append((rule.match, rule.estimate, rule.op_types, rule.name, params, exact,
                          rule.saves_macs and not exact))
    if not rules:
        return
    ctx = RuleContext(g, {r.node_id: r for r in records})
    root = g
    while root.parent is not None:
        root = root.parent
    values = reference_values(root.symbols)  # a conv whose MACs are a formula: "dearer" is decided at this size
    for rec in records:
        ref = at_reference(rec, values)
        op, options = rec.op_type, rec.rewrites
        for match, estimate, op_types, name, params, exact, guard in rules:
            if op_types is not None and op not in op_types:
                continue
            if isinstance(match(rec, ctx), str):  # the reason it does not apply (Rule.check, without two calls)
                continue
            macs_after, params_after, kind_after = estimate(rec, params)
            after = macs_after if ref is rec else estimate(ref, params)[0]
            if guard and ref.macs is not None and after is not None and after > ref.macs:
                continue  # Rule.makes_dearer, at the reference size when the MACs are a formula
            saving = 1 - after / ref.macs if ref.macs and after is not None else None
            options.append(RewriteOption(name, dict(params), exact, macs_after, params_after, kind_after,
                                         saving=saving))


def best_saving(r: ConvRecord) -> tuple[RewriteOption | None, float | None]:
    """The rewrite saving the largest share of this conv's MACs, and that share (None when unknown)."""
    best, share = None, None
    for opt in r.rewrites:
        s = 1 - opt.macs_after / r.macs if r.macs and opt.macs_after is not None else opt.saving
        if s is not None and (share is None or s > share):
            best, share = opt, s
    return best, share
