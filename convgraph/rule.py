"""The rule interface: what a module in ``rules/`` defines, and the context a rule builds with.

A rule module exposes ``RULE = Rule(...)``. Matching (``match``) is separate from building
(``build``): ``match`` returns the reason a rule does not apply to a conv (a string), else ``None`` (it
applies to the conv alone) or a :class:`Match` naming the nodes it spans, which ``build`` then receives
as a fourth argument (so that it need not rediscover them). ``build`` returns a :class:`Replacement`:
new nodes and initializers computed from the matched nodes' weights. The engine (convgraph.engine.rewrite)
splices them in, names, checks and verifies; callers go through :meth:`Rule.check` and :meth:`Rule.make`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from .errors import ModelError, UsageError
from .model.record import ConvRecord


class Skip(ModelError):
    """Raised by a rule's ``build`` when it cannot rewrite this conv after all (weights that are not finite,
    calibration data that is not, a fit that failed): the engine leaves the conv as it was and records why."""


@dataclass(frozen=True)
class Param:
    """A rule parameter: ``--param name=value`` on the command line."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str


@dataclass(frozen=True)
class Match:
    """What ``match`` found where a rule applies: the node ids it spans (the conv first) and named bindings
    (``match["bn"]``) for ``build``."""

    nodes: tuple[str, ...]
    bindings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]


@dataclass
class Replacement:
    """What a rule puts in place of the matched node(s).

    The new nodes must produce the replaced nodes' output tensors under the same names (so nothing
    downstream changes); their intermediate tensors and initializers take names from ``ctx.name``.
    """

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    exact: bool
    kind_after: str  # e.g. "depthwise+pointwise"
    macs_after: int | None
    params_after: int
    removed: list[str] = field(default_factory=list)  # node ids replaced; default: the matched conv
    weight_error: float | None = None  # relative Frobenius error of the effective kernel (approximate rules)
    notes: str = ""
    #: MACs and params of all the replaced nodes when they are more than the matched conv (None: the conv's)
    macs_before: int | None = None
    params_before: int | None = None
    #: ask the engine to quantize the new nodes after the pass (rule ``int8``): {"calibration": method,
    #: "reduce_range": "auto"|"yes"|"no"} (convgraph.engine.quantize: onnxruntime's quantizer, ranges on --calib)
    quantize: dict | None = None


@dataclass(frozen=True)
class Rule:
    """A rewrite rule. ``exact`` is True, False, or a callable params → bool (e.g. separable rank=full)."""

    name: str
    summary: str
    exact: "bool | Callable[[dict], bool]"
    params: tuple[Param, ...]
    match: Callable[[ConvRecord, "RuleContext"], "str | Match | None"]
    build: Callable[..., Replacement]  # (rec, ctx, params), and the Match when match returned one
    estimate: "Callable[[ConvRecord, dict], tuple[int | None, int, str]] | None" = None  # macs, params, kind after
    prepass: bool = False  # run before the others (fold-bn)
    #: the rule approximates to save compute: an approximate rewrite that would add MACs is not applied
    #: unless the user named the node (False for rules that approximate for another end)
    saves_macs: bool = True
    #: the convs whose calibration statistics a data-aware rewrite of a conv needs (rec, ctx) -> node ids;
    #: None: the conv's own (``prune`` refits the consumer convs, so it needs theirs)
    calibrates: "Callable[[ConvRecord, RuleContext], list[str]] | None" = None
    #: the rule's replacements are quantized by the engine (``Replacement.quantize``): it needs activation ranges
    #: calibrated on ``--calib`` (and no patch statistics), and a model at opset 13 or later
    quantizes: bool = False
    #: the op types ``match`` can accept (None: any): the analyzer asks a rule only about convs of these types
    op_types: "tuple[str, ...] | None" = None

    def is_exact(self, params: dict) -> bool:
        return self.exact(params) if callable(self.exact) else bool(self.exact)

    def makes_dearer(self, params: dict, macs_before: "int | None", macs_after: "int | None") -> bool:
        """Whether this is an approximation for speed that would add MACs: the engine leaves such a conv alone
        unless the user names it, and the analyzer does not offer it."""
        return (self.saves_macs and not self.is_exact(params) and macs_before is not None and macs_after is not None
                and macs_after > macs_before)

    def check(self, rec: ConvRecord, ctx: "RuleContext") -> "tuple[str | None, Match | None]":
        """(why the rule does not apply, None), or (None, what match found: its Match, None for the conv alone)."""
        found = self.match(rec, ctx)
        return (found, None) if isinstance(found, str) else (None, found)

    def why_not(self, rec: ConvRecord, ctx: "RuleContext") -> str | None:
        """None when the rule applies to ``rec``, else the reason."""
        return self.check(rec, ctx)[0]

    def matched(self, rec: ConvRecord, ctx: "RuleContext", found: "Match | None" = None) -> Match:
        """What ``match`` found for a rule whose match spans nodes (``found`` when given): for a ``build``
        called without it. :class:`Skip` with the reason when the rule does not apply."""
        if found is not None:
            return found
        got = self.match(rec, ctx)
        if not isinstance(got, Match):
            raise Skip(got or f"rule {self.name} matched the conv alone")
        return got

    def make(self, rec: ConvRecord, ctx: "RuleContext", params: dict, found: "Match | None" = None) -> Replacement:
        """``build``, handing it what ``match`` found when that was a :class:`Match`."""
        return self.build(rec, ctx, params) if found is None else self.build(rec, ctx, params, found)

    def calibrate_nodes(self, rec: ConvRecord, ctx: "RuleContext") -> list[str]:
        """The convs whose calibration statistics a rewrite of ``rec`` by this rule fits on (default: ``rec``'s)."""
        return [rec.node_id] if self.calibrates is None else list(self.calibrates(rec, ctx))

    def resolve_params(self, given: dict[str, str]) -> dict[str, Any]:
        """Defaults overlaid with ``given`` (strings parsed); UsageError on an unknown or bad value."""
        known = {p.name: p for p in self.params}
        out = {p.name: p.default for p in self.params}
        for k, v in given.items():
            if k not in known:
                continue  # params are shared across the rules of one command; each takes its own
            try:
                out[k] = known[k].parse(v) if isinstance(v, str) else v
            except (ValueError, TypeError) as e:  # say what is valid, not what Python's int() said
                python = str(e).startswith(("invalid literal", "could not convert")) or not str(e)
                why = f"{k} is {known[k].help}" if python else str(e)
                raise UsageError(f"rule {self.name}: bad value {v!r} for --param {k}: {why} (default "
                                 f"{known[k].default})") from None
        return out


class RuleContext:
    """What a rule may look at while matching and building: the graph, constant values, fresh names."""

    def __init__(self, graph, records: "dict[str, ConvRecord] | None" = None, calibration: "dict | None" = None,
                 params: "dict | None" = None):
        self.graph = graph  # the ConvGraph holding the conv
        self.records = records or {}  # node_id -> ConvRecord, for patterns spanning nodes
        self.calibration = calibration or {}  # tensor name -> statistics (data-aware fits)
        self.params = params or {}  # the rule's resolved params, for matches that depend on them
        self.memo: dict = {}  # what checks shared by several rules found per conv (the analyzer asks every rule)

    def value(self, tensor: str) -> np.ndarray | None:
        """The constant value of ``tensor`` (initializer, Constant, ConstantOfShape, DequantizeLinear...)."""
        from .model.weights import constant_value

        return constant_value(self.graph, tensor)

    def constant(self, tensor: str) -> np.ndarray:
        """The value of ``tensor``, which ``match`` found constant: :class:`Skip` when it is not after all."""
        v = self.value(tensor)
        if v is None:
            raise Skip(f"{tensor!r} is not a constant")
        return v

    def name(self, base: str) -> str:
        """A fresh tensor name derived from ``base`` (``<conv>/dw``, ``<conv>/pw_W`` ...)."""
        return self.graph.unique_tensor(base)

    def initializer(self, base: str, array: np.ndarray) -> onnx.TensorProto:
        """A new initializer with a fresh name derived from ``base``."""
        return onnx.numpy_helper.from_array(np.ascontiguousarray(array), self.name(base))

    def consumers(self, tensor: str) -> list[str]:
        return self.graph.consumers(tensor)

    def producer(self, tensor: str) -> str | None:
        return self.graph.producer(tensor)

    def node(self, node_id: str) -> onnx.NodeProto:
        return self.graph.node(node_id)


def int_or(word: str) -> Callable[["str | int"], "int | str"]:
    """A param parser taking a positive integer or ``word`` (any case): ``int_or("full")``, ``int_or("auto")``."""

    def parse(text: "str | int") -> "int | str":
        if str(text).lower() == word:
            return word
        if not str(text).strip().lstrip("+-").isdigit():
            raise ValueError(f"must be a positive integer or {word!r}")
        v = int(text)
        if v < 1:
            raise ValueError(f"must be a positive integer or {word!r}")
        return v

    parse.__name__ = parse.__qualname__ = f"int_or_{word}"
    return parse


#: Parse a rank: a positive integer or ``full``.
int_or_full = int_or("full")
