"""What a rewrite did (:class:`Change`, :class:`Explanation`) and how its result was checked (:class:`RewriteReport`).

:mod:`convgraph.engine.rewrite` fills the report and :mod:`convgraph.engine.rewrite_check` adds the checks to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Change:
    """One applied (or, in a dry run, applicable) rewrite of one conv."""

    rule: str
    node: str
    graph: str
    kind_before: str
    kind_after: str
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    exact: bool
    output: str
    new_nodes: list[str] = field(default_factory=list)
    old_nodes: list[str] = field(default_factory=list)
    weight_error: float | None = None
    output_error: float | None = None  # the new nodes against the old ones alone: max abs error / max abs old output
    output_cosine: float | None = None
    output_rms: float | None = None  # the RMS of that error, in the output's units
    #: what an exact change is held to (convgraph.run.tolerance.Bound as a dict: limit, measure, basis)
    tolerance: dict | None = None
    checked_on: str = ""  # the inputs of that check: "activations", "random", both, or why it was not made
    notes: str = ""
    quantized: str = ""  # how the new nodes were quantized (int8 QDQ), "" when they are float
    #: where macs_before / macs_after are None because dims are left dynamic: the MACs as formulas (Expr;
    #: str in to_dict), read off the analysis of the model before and after the change
    macs_before_expr: Any = None
    macs_after_expr: Any = None


@dataclass
class Explanation:
    node: str
    rule: str
    applies: bool
    reason: str
    skipped: bool = False  # the rule matched but could not build (reason says why)


@dataclass
class RewriteReport:
    """What a rewrite did and how its result was checked."""

    model: str
    rules: list[dict[str, Any]]
    changes: list[Change] = field(default_factory=list)
    explain: list[Explanation] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    dry_run: bool = False
    tolerance_required: bool = False  # atol/rtol/min_cosine given: the outputs must pass
    warnings: list[str] = field(default_factory=list)  # what loading the model said (shapes, probe)
    notes: list[str] = field(default_factory=list)  # what the engine did to the model besides the changes (opset)

    @property
    def totals(self) -> dict[str, Any]:
        """Over distinct convs: "before" sums each change's before less what it took over from earlier changes'
        results (fold-bn, then separable on the folded conv: the conv once; fold-bn on a conv, then prune over
        it and a conv fold-bn left alone: both once), "after" the results no later change replaced."""
        made: dict[tuple[str, str], int] = {}  # (graph, node) -> the change that made it
        taken: set[int] = set()
        convs = 0  # changes that start from a conv no earlier change made: distinct convs rewritten
        before: dict[str, list] = {"macs": [], "params": []}

        def of(c: Change, key: str):  # MACs: the number, else the formula; params: always a number
            v = getattr(c, key)
            return getattr(c, f"{key}_expr") if v is None and key.startswith("macs") else v

        for i, c in enumerate(self.changes):
            prev = {made[(c.graph, o)] for o in c.old_nodes if (c.graph, o) in made}
            convs += not prev
            taken |= prev
            for k in before:
                vals = [of(c, f"{k}_before")] + [of(self.changes[j], f"{k}_after") for j in prev]
                before[k].append(None if None in vals else vals[0] - sum(vals[1:]))
            for n in c.new_nodes:
                made[(c.graph, n)] = i
        last = [c for i, c in enumerate(self.changes) if i not in taken]

        def total(vals):
            if any(v is None for v in vals):
                return None
            t = sum(vals)
            return int(t) if isinstance(t, int) else t  # a formula where dims are left dynamic

        macs = {"before": total(before["macs"]), "after": total([of(c, "macs_after") for c in last])}
        return {"rewritten": convs, "changes": len(self.changes),
                **{f"macs_{k}": v if type(v) is int else None for k, v in macs.items()},
                **{f"macs_{k}_expr": v for k, v in macs.items() if v is not None and type(v) is not int},
                "params_before": total(before["params"]), "params_after": total([c.params_after for c in last])}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = self.totals
        for item in [*d["changes"], d["totals"]]:  # formulas as Python integer expressions, as ConvRecord's
            for key in ("macs_before_expr", "macs_after_expr"):
                if item.get(key) is not None:
                    item[key] = str(item[key])
        return d
