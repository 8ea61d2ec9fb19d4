"""``convgraph rules``: the available rewrite rules."""

from __future__ import annotations

from ..registry import all_rules
from . import cli
from .common import emit_json, json_option
from .tables import Column, show


def _exactness(rule) -> str:
    if callable(rule.exact):
        return "depends on params"
    return "exact" if rule.exact else "approximate"


@cli.command("rules")
@json_option
def rules_command(as_json: bool) -> None:
    """List the rewrite rules: summary, parameters and exactness."""
    rules = all_rules()
    if as_json:
        emit_json([{"name": r.name, "summary": r.summary, "exact": _exactness(r), "prepass": r.prepass,
                    "params": [{"name": p.name, "default": p.default, "help": p.help} for p in r.params]}
                   for r in rules.values()])
        return
    show([Column("rule"), Column("exact"), Column("summary"), Column("params (default)")],
         [(r.name, _exactness(r), r.summary, "\n".join(f"{p.name}={p.default}: {p.help}" for p in r.params) or "-")
          for r in rules.values()], title="convgraph rules")
